"""An offline corpus every machine has: the source code of the installed Python packages.

One document per package (a standard-library package or module, or a top-level entry of
site-packages), repository-level: the package's ``.py`` files concatenated in sorted path order, each
preceded by a path header, so imports and definitions sit far before their uses. Packages are
split into train / validation / test by a hash of (seed, name), so the split of a package does not
depend on which other packages are installed.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

SPLITS = ("train", "val", "test")
HEADER = "# ===== file: {path} =====\n"


@dataclass(frozen=True)
class Package:
    """name: unique document name ("stdlib/json", "site/torch"); root: a directory or one .py file."""

    name: str
    root: Path

    def files(self) -> List[Path]:
        if self.root.is_file():
            return [self.root]
        return sorted(p for p in self.root.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)


def _entries(root: Path, prefix: str, skip: Sequence[str]) -> List[Package]:
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.name in skip or p.name.startswith((".", "__editable__")):
            continue
        if p.name.endswith((".dist-info", ".egg-info", ".data", ".pth")) or p.name == "__pycache__":
            continue
        if p.is_dir() or (p.is_file() and p.suffix == ".py"):
            out.append(Package(f"{prefix}/{p.stem if p.is_file() else p.name}", p))
    return out


def find_packages(include_stdlib: bool = True, include_site_packages: bool = True,
                  extra_roots: Sequence[str] = ()) -> List[Package]:
    """Packages of the running interpreter, sorted by name. extra_roots: more directories whose
    top-level entries are packages (used by tests)."""
    paths = sysconfig.get_paths()
    pkgs: List[Package] = []
    if include_stdlib:
        pkgs += _entries(Path(paths["stdlib"]), "stdlib", skip=("site-packages", "dist-packages"))
    if include_site_packages:
        seen = set()
        for key in ("purelib", "platlib"):
            root = Path(paths[key])
            if root in seen:
                continue
            seen.add(root)
            pkgs += _entries(root, "site", skip=())
    for i, r in enumerate(extra_roots):
        pkgs += _entries(Path(r), f"extra{i}", skip=())
    uniq: Dict[str, Package] = {}
    for p in pkgs:
        uniq.setdefault(p.name, p)
    return [uniq[n] for n in sorted(uniq)]


def _unit(seed: int, name: str, salt: str) -> float:
    h = hashlib.sha256(f"{salt}:{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64


def split_of(name: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one package from a hash of (seed, name)."""
    u = _unit(seed, name, "split")
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def package_text(pkg: Package, max_file_bytes: int) -> str:
    """The package's files, sorted by relative path, each after a path header. Files larger than
    max_file_bytes (generated tables, vendored bundles) and undecodable files are skipped."""
    parts = []
    base = pkg.root.parent
    for f in pkg.files():
        try:
            if f.stat().st_size > max_file_bytes:
                continue
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        parts.append(HEADER.format(path=f.relative_to(base).as_posix()) + text.rstrip("\n") + "\n")
    return "".join(parts)


def iter_documents(packages: Sequence[Package], split: str, *, seed: int, val_fraction: float,
                   test_fraction: float, max_bytes: int, max_file_bytes: int) -> Iterator[Dict[str, str]]:
    """{"name", "text"} of the split's packages in a seeded order, until max_bytes of text are read
    (the package that crosses the budget is cut at a line end to fit). Deterministic for a given install."""
    check_split(split)
    chosen = [p for p in packages if split_of(p.name, seed, val_fraction, test_fraction) == split]
    chosen.sort(key=lambda p: (_unit(seed, p.name, "order"), p.name))
    total = 0
    for p in chosen:
        if total >= max_bytes:
            break
        text = package_text(p, max_file_bytes)
        if total + len(text) > max_bytes:
            cut = text.rfind("\n", 0, max_bytes - total)
            text = text[:cut + 1] if cut >= 0 else ""
        if not text:
            continue
        total += len(text)
        yield {"name": p.name, "text": text}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def corpus_fingerprint(packages: Sequence[Package]) -> str:
    """Hash of the package list (names and paths): cache keys change when the set of packages does."""
    h = hashlib.sha256()
    for p in packages:
        h.update(f"{p.name}\0{p.root}\0".encode())
    return h.hexdigest()[:16]


def budget_bytes(mb: Optional[float]) -> int:
    return int((mb or 0) * 1e6)
