"""Test fake of A1111 v1.10.1 ``modules/errors.py`` (documented behaviour: errors are logged and swallowed).
Everything reported is also kept in ``recorded`` for tests."""
import sys
import traceback

recorded = []


def report(message: str, *, exc_info: bool = False) -> None:
    recorded.append(message)
    print("***", message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e: Exception, task, *, full_traceback=False):
    recorded.append(f"{task}: {type(e).__name__}: {e}")
    print(f"*** {task}", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__)
