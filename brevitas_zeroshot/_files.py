"""The one rule for files: bzq deletes or replaces only what it wrote itself, and only once the new result is whole.

A folder's own record says what bzq wrote there: a synthetic set's ``manifest.json``, a quantized model's
``quant_config.json`` (both carry ``"writer": "brevitas_zeroshot"``). A new result is built in ``.bzq-partial/``
inside its target folder (kept on failure, so an interrupted run resumes from it) and moved in by ``swap_in`` once
it is complete; nothing in the target is touched before then. See docs/promises.md.
"""

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from ._errors import BzqError

__all__ = ["STAGING", "WRITER", "file_mode", "read_own_record", "refuse_foreign", "swap_in", "write_atomic"]

WRITER = "brevitas_zeroshot"
STAGING = ".bzq-partial"


def file_mode() -> int:
    """Permissions for a new file under the process umask, as ``open()`` would give it."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary sibling, then move it over ``path``: readers see the old file or the new
    one, never a part; a failed write leaves the old file and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # some writers create 0600 files whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_own_record(path: Path, required: Iterable[str]) -> dict | None:
    """The JSON record at ``path`` if bzq wrote it (it has every ``required`` key); None if there is no file.

    A file of that name that bzq did not write (or that is damaged) is refused: bzq must not treat the folder as
    its own.
    """
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BzqError(f"'{path}' is not a record bzq can read ({type(e).__name__}); bzq leaves it alone.") from None
    if not isinstance(record, dict) or not (record.get("writer") == WRITER or set(required) <= set(record)):
        raise BzqError(
            f"'{path}' was not written by bzq; bzq never replaces files it did not write: choose another folder."
        )
    return record


def refuse_foreign(folder: Path, names: Iterable[str], why: str) -> None:
    """Refuse when ``folder`` holds any of ``names`` (files bzq would write, but did not write there)."""
    for name in names:
        if (folder / name).exists():
            raise BzqError(
                f"'{folder / name}' exists and {why}; bzq never replaces files it did not write: "
                "choose another folder, or move the file away."
            )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(staging: Path, target: Path, old: Iterable[str], record: str) -> None:
    """Move the complete result in ``staging`` into ``target`` and remove ``staging``.

    ``old`` names the entries of ``target`` that bzq wrote for the result being replaced: those the new result does
    not have are removed, the others replaced. ``record`` (the folder's own record) goes last, and the old one
    first, so a folder is never claimed by a record that does not describe it. Anything else in ``target`` stays.
    """
    new = {p.name for p in staging.iterdir()}
    (target / record).unlink(missing_ok=True)
    for name in set(old) - new - {record}:
        _remove(target / name)
    for name in sorted(new - {record}):
        src, dest = staging / name, target / name
        if src.is_dir() and dest.exists():
            trash = staging.with_name(f"{STAGING}-old-{name}")
            _remove(trash)
            dest.rename(trash)
            src.rename(dest)
            _remove(trash)
        else:
            os.replace(src, dest)
    if record in new:
        os.replace(staging / record, target / record)
    shutil.rmtree(staging)
