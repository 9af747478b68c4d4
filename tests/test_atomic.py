"""Atomic files and folders (ssl_em.atomic): readers never see a half-written result."""

from __future__ import annotations

import pytest


# -- replace_folder: `out` exists at every instant ------------------------------------------------


def _fill(text: str):
    def fill(folder):
        (folder / "meta.json").write_text(text)

    return fill


def _second_replace_fails(monkeypatch):
    """os.replace as seen by ssl_em.atomic, failing on its second call: a crash between the
    two renames of a non-atomic swap."""
    import os

    import ssl_em.atomic as ex

    calls, real = [], os.replace

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("simulated crash between the renames")
        real(a, b)

    monkeypatch.setattr(ex.os, "replace", replace)


def test_replace_folder_swaps_atomically(tmp_path, monkeypatch):
    """With renameat2 the swap is one call: no window without `out`."""
    from ssl_em.atomic import exchange_paths, replace_folder

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not exchange_paths(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()
    out = tmp_path / "model"
    replace_folder(out, _fill("old"), "meta.json")
    _second_replace_fails(monkeypatch)
    replace_folder(out, _fill("new"), "meta.json")
    assert (out / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]  # no temporary left


def test_replace_folder_without_exchange_keeps_the_old_folder(tmp_path, monkeypatch):
    """Fallback (no renameat2): a failure between the renames puts the old folder back, and a
    kill there leaves `.NAME.old`, which the next load or export recovers."""
    import ssl_em.atomic as ex

    out = tmp_path / "model"
    ex.replace_folder(out, _fill("old"), "meta.json")
    monkeypatch.setattr(ex, "exchange_paths", lambda a, b: False)
    with monkeypatch.context() as m:
        _second_replace_fails(m)
        with pytest.raises(OSError, match="simulated crash"):
            ex.replace_folder(out, _fill("new"), "meta.json")
    assert (out / "meta.json").read_text() == "old"
    # A kill between the renames: the old folder sits at .model.old and nothing at `out`.
    out.rename(tmp_path / ".model.old")
    ex.replace_folder(out, _fill("newer"), "meta.json")  # recovers, then replaces as usual
    assert (out / "meta.json").read_text() == "newer" and not (tmp_path / ".model.old").exists()
    out.rename(tmp_path / ".model.old")
    assert (ex.recover_folder(out) / "meta.json").read_text() == "newer"


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    """Text, bytes or a writer callable; the umask's mode even where the writer makes 0600;
    a writer that fails leaves the old file and no temporary behind."""
    import os

    from ssl_em.atomic import write_atomic, write_csv

    path = tmp_path / "scores.json"
    write_atomic(path, "old")
    assert path.read_text() == "old"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"

    def private(tmp):
        tmp.write_text("private")
        os.chmod(tmp, 0o600)  # what safetensors does

    mask = os.umask(0o022)
    try:
        write_atomic(path, private)
    finally:
        os.umask(mask)
    assert path.read_text() == "private" and path.stat().st_mode & 0o777 == 0o644

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, crash)
    assert path.read_text() == "private" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]
    write_csv(tmp_path / "t.csv", ["a", "b"], [{"a": 1, "b": 2, "c": 3}], extrasaction="ignore")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,2"]
