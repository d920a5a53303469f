"""The test lines bench_serve.py and bench_ray.py share: English-looking lines with one
[MASK:k] each. Imports nothing but the standard library. (bench_batch.py keeps its own,
slightly different generator over the same WORDS, which its recorded numbers were
measured with.)"""

from __future__ import annotations

import random

WORDS = ("the of and to in is was for on that with as by at from this be are or an it which his "
         "first new after year city school between during world known people time most other").split()


def make_lines(n: int, seed: int = 0, lo: int = 40, hi: int = 200) -> list[str]:
    """n English-looking lines of lo-hi bytes, each with one [MASK:k] (k = 3..8) after a space."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        words[rng.randrange(1, len(words))] = f"[MASK:{rng.randint(3, 8)}]"
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + ".")
    return lines
