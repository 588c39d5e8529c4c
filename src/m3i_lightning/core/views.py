"""Batch keys of the views: named once, read by the data (which renders them) and the engine
(which plans whose encoder pass reads which)."""

GLOBAL_VIEWS = ("view1", "view2")  # batch keys of the two global views


def local_view_names(count: int) -> tuple[str, ...]:
    """Batch keys of the local crops: local1, local2, ..."""
    return tuple(f"local{i + 1}" for i in range(count))
