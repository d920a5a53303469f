"use strict";
// Renders /openapi.json as a list of routes, offline: each operation, its request body
// schema, and every answer with its schema (component references resolved by name).
(async () => {
  const main = document.getElementById("routes");
  let doc;
  try {
    const response = await fetch("/openapi.json", { headers: { Accept: "application/json" } });
    doc = await response.json();
  } catch (e) {
    main.textContent = "cannot read /openapi.json: " + e.message;
    return;
  }
  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  };
  const components = (doc.components && doc.components.schemas) || {};
  const resolve = (schema, seen = new Set()) => {
    if (schema && schema.$ref) {
      const name = schema.$ref.split("/").pop();
      if (seen.has(name)) return { $ref: name };
      return resolve(components[name], new Set([...seen, name]));
    }
    if (Array.isArray(schema)) return schema.map((s) => resolve(s, seen));
    if (schema && typeof schema === "object") {
      const out = {};
      for (const [k, v] of Object.entries(schema)) out[k] = resolve(v, seen);
      return out;
    }
    return schema;
  };
  document.getElementById("about").textContent = `${doc.info.title} ${doc.info.version}, OpenAPI ${doc.openapi}`;
  main.replaceChildren();
  if (doc.info.description) main.appendChild(el("p", doc.info.description));
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const box = el("section", undefined, "route");
      const title = el("h2");
      title.appendChild(el("span", method.toUpperCase(), "method"));
      title.appendChild(el("code", path));
      box.appendChild(title);
      if (op.summary) box.appendChild(el("p", op.summary));
      if (op.description) box.appendChild(el("p", op.description));
      const list = el("dl");
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        for (const [type, media] of Object.entries(body)) {
          list.appendChild(el("dt", `request (${type})`));
          const dd = el("dd");
          dd.appendChild(el("pre", JSON.stringify(resolve(media.schema), null, 2)));
          list.appendChild(dd);
        }
      }
      for (const [status, answer] of Object.entries(op.responses || {})) {
        list.appendChild(el("dt", `${status}: ${answer.description || ""}`));
        const dd = el("dd");
        for (const [type, media] of Object.entries(answer.content || {})) {
          dd.appendChild(el("div", type));
          if (media.schema) dd.appendChild(el("pre", JSON.stringify(resolve(media.schema), null, 2)));
        }
        list.appendChild(dd);
      }
      box.appendChild(list);
      main.appendChild(box);
    }
  }
})();
