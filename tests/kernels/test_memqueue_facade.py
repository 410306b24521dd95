"""The public queue facade: settings checked and turned into a SpillQueue."""
import pytest

from smirror.daemon import config
from smirror.errors import ConfigError
from smirror.kernels import memqueue
from smirror.kernels._memqueue import SpillQueue


def test_settings_accept_sizes_as_text():
    s = memqueue.QueueSettings(memory_limit="4MiB", disk_limit="1 GiB", segment_size="8MiB",
                               min_free_bytes="512MiB", fsync="always", durable=True)
    assert (s.memory_limit, s.disk_limit, s.segment_size, s.min_free_bytes) == (
        4 << 20, 1 << 30, 8 << 20, 512 << 20)


@pytest.mark.parametrize("kwargs, message", [
    (dict(memory_limit="lots"), "queue memory_limit"),
    (dict(disk_limit=-1), "queue disk_limit"),
    (dict(segment_size=100), "segment_size: at least 4096"),
    (dict(read_buffer="1KiB"), "read_buffer: at least 64KiB"),
    (dict(fsync="never"), "fsync: one of none, segment, always"),
    (dict(durable="yes"), "durable: expected true or false"),
    (dict(spare_segments=-1), "spare_segments"),
])
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        memqueue.QueueSettings(**kwargs)


def test_from_config_makes_target_queues_durable():
    cfg = config.from_mapping({"queues": {"target_memory_limit": "32MiB", "fsync": "always"}})
    target = memqueue.QueueSettings.from_config(cfg, "target")
    source = memqueue.QueueSettings.from_config(cfg, "source")
    assert target.durable and not source.durable
    assert target.memory_limit == 32 << 20 and source.memory_limit == 256 << 20
    assert target.fsync == "always" and target.min_free_bytes == 1 << 30
    with pytest.raises(ConfigError, match="role"):
        memqueue.QueueSettings.from_config(cfg, "middle")


def test_open_queue_builds_the_compiled_queue(tmp_path):
    s = memqueue.QueueSettings(memory_limit=100, disk_limit="1MiB", segment_size=4096,
                               durable=True, spare_segments=0)
    path = memqueue.queue_dir(tmp_path, "target", "c1")
    assert path == str(tmp_path / "target-c1")
    with memqueue.open_queue(path, s) as q:
        assert type(q) is SpillQueue
        assert (q.memory_limit, q.disk_limit, q.segment_size, q.durable, q.spare_segments) == (
            100, 1 << 20, 4096, True, 0)
        q.put(1, b"x" * 200)
        assert q.get() == (1, b"x" * 200)
    with pytest.raises(ConfigError, match="connection ids"):
        memqueue.queue_dir(tmp_path, "target", "../evil")
