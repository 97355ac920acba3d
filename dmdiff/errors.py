"""User-facing error types and the command line's exit statuses.

Every ``dmdiff`` subcommand ends with one of these exit statuses (README, ``dmdiff --help``):

=====  ==============================================================================================
0      done
1      done, but some items failed; they are listed (e.g. an unreadable photo in a folder restore)
2      bad usage or input: a wrong argument, config key, file or folder; nothing was changed
3      the run was interrupted or faulted (Ctrl-C, SIGTERM, disk full, out of memory, a non-finite
       loss...): what was finished is kept, and rerunning the command (``--resume`` where the
       subcommand has it) continues
=====  ==============================================================================================

:class:`DmdiffError` and its subclasses are printed without a traceback (status 2);
:class:`RunFault` is printed the same way with status 3.
"""

import errno

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_FAULT = 3

#: ``OSError.errno`` values that mean "no room to write": a full disk, a quota, a file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DmdiffError(Exception):
    """Base class for errors caused by input the user can fix (files, configs, arguments): status 2."""

    exit_code = EXIT_USAGE


class ConfigError(DmdiffError, ValueError):
    """A config file or value is wrong: unknown key, wrong type, value out of range."""


class ImageReadError(DmdiffError, ValueError):
    """An image file cannot be read or converted; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class RunFault(DmdiffError):
    """A run stopped part-way for a reason outside the inputs' form (disk full, non-finite loss, an
    interruption): status 3. The message says what was kept and how to continue."""

    exit_code = EXIT_FAULT
