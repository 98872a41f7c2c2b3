"""replaced_in_place: a file written in full beside its target, then renamed over it; an error names the target."""

import errno

import pytest

from keras_metalstm.paths import replaced_in_place


@pytest.mark.parametrize("named", ["the temporary file", "no file"])
def test_a_failed_write_names_the_target_not_its_temporary_file_and_leaves_neither(tmp_path, named):
    """A read-only run folder made `train --resume` say "cannot write .tmp-27500-config.yaml"."""
    target = tmp_path / "config.yaml"
    with pytest.raises(OSError) as raised, replaced_in_place(target) as tmp:
        tmp.write_text("half")
        filename = str(tmp) if named == "the temporary file" else None
        raise OSError(errno.EROFS, "Read-only file system", filename)
    assert raised.value.filename == str(target) and raised.value.errno == errno.EROFS
    assert list(tmp_path.iterdir()) == []
