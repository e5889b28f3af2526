import hashlib
from pathlib import Path

import pytest

from libs.common.artifacts import ArtifactError, ArtifactStore, sha256_dir


def test_write_lines_is_atomic_and_hashed(tmp_path: Path):
    store = ArtifactStore(tmp_path / "a")
    art = store.write_lines([b"one\n", b"two\n"], "datasets", "x.jsonl")
    assert art.sha256 == hashlib.sha256(b"one\ntwo\n").hexdigest() and art.size == 8
    path = store.verify(art.uri, art.sha256)
    assert path.read_bytes() == b"one\ntwo\n"
    assert not list(path.parent.glob(".part-*"))


def test_failed_write_leaves_nothing(tmp_path: Path):
    store = ArtifactStore(tmp_path)

    def lines():
        yield b"a\n"
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        store.write_lines(lines(), "datasets", "y.jsonl")
    assert list((tmp_path / "datasets").iterdir()) == []


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "http://example.invalid/x", "file://otherhost/tmp/x", "s3://bucket/key",
])
def test_uris_outside_the_store_are_refused(tmp_path: Path, uri: str):
    with pytest.raises(ArtifactError):
        ArtifactStore(tmp_path / "store").path_for(uri)


def test_traversal_through_dotdot_is_refused(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactError):
        store.path_for((tmp_path / "store" / ".." / "secret").as_uri())


def test_location_sanitises_untrusted_names(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    path = store.location("uploads", "../../etc/passwd")
    assert path.parent == store.root / "uploads" and path.name == "passwd"
    assert store.location("uploads", "..hidden").name == "hidden"


def test_verify_detects_tampering(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    art = store.write_bytes(b"data\n", "f.txt")
    store.path_for(art.uri).write_bytes(b"evil\n")
    with pytest.raises(ArtifactError, match="does not match"):
        store.verify(art.uri, art.sha256)


def test_directory_hash_depends_on_names_and_content(tmp_path: Path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a").write_text("1")
    (d / "b").write_text("2")
    first = sha256_dir(d)
    (d / "b").write_text("3")
    assert sha256_dir(d) != first
    store = ArtifactStore(tmp_path)
    art = store.describe_dir(d)
    assert store.verify(art.uri, art.sha256) == d.resolve()


def test_write_atomically_replaces_whole_files_and_hashes(tmp_path: Path):
    from libs.common.artifacts import write_atomically

    target = tmp_path / "own" / "state.json"
    sha, size = write_atomically(target, [b'{"a":', b"1}"])
    assert target.read_bytes() == b'{"a":1}' and size == 7 and sha == hashlib.sha256(b'{"a":1}').hexdigest()

    def broken():
        yield b"half"
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(target, broken())
    assert target.read_bytes() == b'{"a":1}'
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]
