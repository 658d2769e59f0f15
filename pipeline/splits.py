"""Stable train/val/test splits: an image's split depends on its id, its class and the seed, never on which other
images exist, so a growing folder keeps last week's test images in test.

Each image gets a number u in [0, 1): the first 8 bytes of a BLAKE2b hash of its class name and id, keyed by the
seed. It goes to test when u < test_fraction, to val when u < test_fraction + val_fraction, and to train
otherwise. Adding or removing images changes no other image's u, so it moves no other image. Per class the
shares approach the fractions as the class grows (the count in a split is binomial: n·f ± sqrt(n·f·(1 - f))).

Carving (a train/ folder beside a test/ one): only the splits named in ``carve`` are made out of train/; the
bands stay where they are, and an image in the band of a split that is not carved stays in train.

Small classes: a class is big enough when it has one image per split it needs: 3 when both fractions are above 0
(train, val and test), 2 when one is 0 or not carved, and a smaller class is refused in one line. Every class big
enough has at least one image in every split it needs, train included, whatever the seed. Where no image of the
class hashes into a split, one image stands in: taken from train while train keeps another image, else from the
split that has more than one; of that split, the image whose number lies nearest to the empty split's band (the
lowest-hashed train image for val or test). Such a stand-in is the one exception to "never moves": it goes back
once the class gets an image that hashes into that split by itself. With the default fractions that happens only
to classes of a few dozen images or fewer (no test image among 30 has a chance of 0.8^30 = 0.1%).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

from pipeline.errors import PipelineError

SPLITS = ("train", "val", "test")


def position(class_name: str, item_id: str, seed: int, purpose: str = "split") -> float:
    """The image's number in [0, 1) for ``purpose``, from its class and id alone (see the module docstring)."""
    key = seed.to_bytes(8, "little") + purpose.encode()
    digest = hashlib.blake2b(f"{class_name}\0{item_id}".encode(), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign(
    ids: Sequence[str],
    class_names: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    carve: Collection[str] | None = None,
) -> list[str]:
    """The split of each image (``class_names[i]`` is image i's class), as the module docstring describes.

    ``carve``: the splits to carve out of a train/ folder (the others have folders of their own); None splits the
    images into all three."""
    made = {"val", "test"} if carve is None else set(carve)
    if not made <= {"val", "test"}:
        raise ValueError(f"only val and test are carved out of train, not {sorted(made)}")
    bands = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction)}
    bands["train"] = (test_fraction + val_fraction, 1.0)
    u = [position(c, i, seed) for i, c in zip(ids, class_names, strict=True)]
    splits = [next(s for s, (lo, hi) in bands.items() if lo <= x < hi) for x in u]
    splits = [s if s in made else "train" for s in splits]  # a band not carved stays in train
    by_class: dict[str, list[int]] = {}
    for k, c in enumerate(class_names):
        by_class.setdefault(c, []).append(k)
    needed = ["train"] + [s for s in ("test", "val") if s in made and bands[s][1] > bands[s][0]]
    for c, members in sorted(by_class.items()):
        if len(members) < len(needed):
            raise PipelineError(f"class {c!r} has {len(members)} image(s){_too_few(c, needed, carve)}")
        for s in needed:
            if not any(splits[k] == s for k in members):
                stand_in = _stand_in(members, splits, u, bands[s])
                splits[stand_in] = s
    return splits


def _too_few(class_name: str, needed: Sequence[str], carve: Collection[str] | None) -> str:
    """The rest of the message for a class smaller than ``needed``: what it needs and what to do."""
    if carve is None:
        return (
            f": splitting it into {', '.join(needed)} needs at least {len(needed)}. Add images, or give explicit "
            "train/ val/ test/ folders"
        )
    carved = needed[1:]
    folders = f"a {carved[0]}/ folder" if len(carved) == 1 else " and ".join(f"{s}/" for s in carved) + " folders"
    return (
        f" under train/: carving {' and '.join(carved)} out of train/ needs at least {len(needed)} "
        f"({', '.join(needed)}). Add images of class {class_name!r} under train/, or add {folders}"
    )


def _stand_in(members: Sequence[int], splits: Sequence[str], u: Sequence[float], band: tuple[float, float]) -> int:
    """The image that fills an empty split: from train while train keeps another image, else from a split of more
    than one; of those, the one whose number lies nearest to ``band``."""
    count = {s: sum(splits[k] == s for k in members) for s in SPLITS}
    donors = ["train"] if count["train"] > 1 else [s for s in SPLITS if count[s] > 1]
    lo, hi = band
    return min((k for k in members if splits[k] in donors), key=lambda k: (max(lo - u[k], u[k] - hi, 0.0), u[k]))


def keep_per_class(ids: Sequence[str], class_names: Sequence[str], limit: int, seed: int) -> set[str]:
    """``limit`` ids of each class, the lowest-hashed ones: adding an image swaps at most one in or out."""
    by_class: dict[str, list[str]] = {}
    for i, c in zip(ids, class_names, strict=True):
        by_class.setdefault(c, []).append(i)
    keep: set[str] = set()
    for c, members in by_class.items():
        keep.update(sorted(members, key=lambda i: position(c, i, seed, "limit"))[:limit])
    return keep
