import subprocess
import sys
from pathlib import Path

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"


def test_operator_source_folder_does_not_shadow_the_standard_library() -> None:
    # A fresh interpreter with the source folder first on its path, as a developer
    # running from `operator/` would have: `operator` must still be the stdlib module.
    probe = "import operator, somabrain_operator; print(operator.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=OPERATOR_DIR,
        env={"PYTHONPATH": str(OPERATOR_DIR)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert not (OPERATOR_DIR / "__init__.py").exists()
    assert not (OPERATOR_DIR / "operator").exists()
    assert not (OPERATOR_DIR / "operator.py").exists()
    assert str(OPERATOR_DIR) not in result.stdout


def test_public_surface_is_small_and_explicit() -> None:
    import somabrain

    assert sorted(somabrain.__all__) == [
        "EnqueueResult",
        "EnqueueStatus",
        "EventId",
        "Journal",
        "JournalMigrator",
        "NewEvent",
        "TenantId",
        "emit_event",
        "emit_events",
        "enqueue_event",
        "enqueue_events",
    ]
