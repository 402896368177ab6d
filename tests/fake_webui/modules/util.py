"""Test fake of A1111 v1.10.1 ``modules/util.py``: ``MassFileLister`` answers existence and (mtime, ctime) queries.
The real one caches a directory listing; this one simply stats the file each time."""
import os


class MassFileLister:
    def exists(self, path):
        return os.path.exists(path)

    def mctime(self, path):
        """(mtime, ctime) of the file, (0, 0) when it is missing."""
        try:
            st = os.stat(path)
        except OSError:
            return 0, 0
        return st.st_mtime, st.st_ctime

    def reset(self):
        pass
