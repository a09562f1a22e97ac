"""The GGUF's converted folder is keyed by the file's content, not its path or time: each environment that
installs the default model has its own copy of the file, and must not add another 540 MB folder to the cache."""

from __future__ import annotations

import shutil

from model.default_model import default_model_path
from model.loader import _content_key, resolve_model


def test_a_copy_of_the_gguf_elsewhere_resolves_to_the_same_folder(model_folder, tmp_path):
    copy = tmp_path / "another-env" / default_model_path().name
    copy.parent.mkdir()
    shutil.copyfile(default_model_path(), copy)  # another path, a new modification time
    assert resolve_model(str(copy)) == model_folder


def test_content_key_follows_the_bytes(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"GGUF" + bytes(range(200)))
    b.write_bytes(a.read_bytes())
    c.write_bytes(b"GGUF" + bytes(range(1, 201)))

    def key(p):
        st = p.stat()
        return _content_key(p, st.st_size, st.st_mtime_ns)

    assert key(a) == key(b) != key(c)
