"""The one error a stage link raises for anything that is not a programming mistake."""


class StageLinkError(RuntimeError):
    """UCX is missing or cannot start, a peer address is unusable, or a transfer failed."""
