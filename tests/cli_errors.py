"""How a command-line user error must look: exactly one `dimple: error:` line on stderr and no traceback.

Other stderr lines are tolerated: optional packages (e.g. torchao) may print import warnings of their own.
"""


def user_error_line(stderr: str) -> str:
    """The single error line of a user error; fails the test on a traceback or on several error lines."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("dimple: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
