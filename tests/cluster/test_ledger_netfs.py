"""A SQLite ledger on a network filesystem is refused (its WAL and locks do not work there); the mount is
found from mountinfo text by the longest mount point above the ledger's folder."""

from __future__ import annotations

import pytest

from cluster import ledger_sql
from cluster.ledger import JobLedger, LedgerError
from cluster.ledger_sql import filesystem_of, network_fs_of

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /shared rw,relatime shared:5 - nfs4 fs1:/export rw,vers=4.2
31 30 0:41 / /shared/local rw,relatime shared:6 - tmpfs tmpfs rw
32 22 0:42 / /mnt/my\\040share rw,relatime - cifs //nas/share rw
33 22 0:43 / /home/me/remote rw - fuse.sshfs me@box:/srv rw
34 22 0:44 / /sharedx rw - xfs /dev/sdb1 rw
"""


def test_the_longest_mount_point_above_the_folder_decides():
    assert filesystem_of("/shared/runs/x", MOUNTINFO) == ("nfs4", "/shared")
    assert filesystem_of("/shared/local/runs", MOUNTINFO) == ("tmpfs", "/shared/local")
    assert filesystem_of("/sharedx/runs", MOUNTINFO) == ("xfs", "/sharedx")     # a prefix is not a parent
    assert network_fs_of("/shared/runs", MOUNTINFO) == "nfs4"
    assert network_fs_of("/shared/local/runs", MOUNTINFO) is None
    assert network_fs_of("/mnt/my share/l", MOUNTINFO) == "cifs"                 # \\040 is a space
    assert network_fs_of("/home/me/remote/l", MOUNTINFO) == "fuse.sshfs"
    assert network_fs_of("/var/lib", MOUNTINFO) is None


def test_a_sqlite_ledger_on_a_network_filesystem_is_refused(tmp_path, monkeypatch):
    info = tmp_path / "mountinfo"
    info.write_text(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 22 0:50 / {tmp_path} rw - nfs4 srv:/x rw\n")
    real = ledger_sql.refuse_network_fs
    monkeypatch.setattr(ledger_sql, "refuse_network_fs", lambda folder: real(folder, str(info)))
    with pytest.raises(LedgerError, match=r"network filesystem \(nfs4\).*postgresql://"):
        JobLedger(tmp_path / "ledger.sqlite")
    assert not (tmp_path / "ledger.sqlite").exists()
    monkeypatch.setenv(ledger_sql.ALLOW_NETWORK_FS_ENV, "1")
    with pytest.warns(RuntimeWarning, match="opening it anyway"):
        JobLedger(tmp_path / "ledger.sqlite").close()
