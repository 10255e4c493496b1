import importlib
import operator


def test_operator_package_does_not_shadow_the_standard_library() -> None:
    assert hasattr(operator, "itemgetter")
    assert importlib.import_module("somabrain_operator").__name__ == "somabrain_operator"


def test_public_surface_is_small_and_explicit() -> None:
    import somabrain

    assert sorted(somabrain.__all__) == [
        "EnqueueResult",
        "EnqueueStatus",
        "EventId",
        "TenantId",
        "enqueue_event",
    ]
