"""Questions an experiment asks the federation: which nodes hold the data, and what they said of a plan.

    data = find_training_data(requests, ["diabetes"], nodes=None, name_of=str)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fedsilo.network.messages import DatasetInfo, PlanStatusReply

from .requests import Collected, Requests
from .settings import ExperimentError

log = logging.getLogger("fedsilo.researcher.experiment")


def find_training_data(
    requests: Requests, tags: list[str], nodes: Sequence[str] | None, name_of: Callable[[str], str] = str
) -> dict[str, DatasetInfo]:
    """Node -> the one dataset it holds with all `tags` (among `nodes`, or every node online).

    A node with two such datasets is an error (a tag must tell them apart); silent nodes are logged."""
    got = requests.search(tags, nodes=nodes)
    data: dict[str, DatasetInfo] = {}
    for node, reply in sorted(got.replies.items()):
        datasets = getattr(reply, "datasets", [])
        if len(datasets) > 1:
            names = ", ".join(d.name for d in datasets)
            raise ExperimentError(
                f"node {name_of(node)} holds {len(datasets)} datasets tagged {tags} ({names}); "
                "add a tag that tells them apart"
            )
        if datasets:
            data[node] = datasets[0]
    for _node, err in sorted(got.errors.items()):
        log.warning("search: %s", err)
    if got.missing:
        log.warning("search: no reply from %s within %gs", ", ".join(got.missing), requests.timeouts.request)
    if data:
        log.info("tags %s: found on %s", tags, ", ".join(f"{name_of(n)}:{d.name}" for n, d in data.items()))
    else:
        log.warning("%s", no_data_message(tags, len(got.replies), requests.online_nodes(wait=False)))
    return data


def no_data_message(tags: list[str] | None, searched: int, online: Sequence[str]) -> str:
    where = f"{searched} node(s) answered ({', '.join(online) or 'none online'})"
    return (
        f"no node holds a dataset with all the tags {tags}: {where}; check the tags with "
        "exp.requests().list_datasets(), or start the nodes that hold the data"
    )


def statuses(got: Collected, kind: type, request_timeout: float) -> dict[str, str]:
    """Node -> a plan's status as `kind` replies say, an error, or silence, sorted by node."""
    out: dict[str, str] = {}
    for node, reply in got.replies.items():
        if isinstance(reply, kind):
            status = reply.status  # type: ignore[attr-defined]
            if isinstance(reply, PlanStatusReply) and not reply.approval_required:
                status = f"not required ({status})"
            out[node] = status
    for node, err in got.errors.items():
        out[node] = f"error: {err}"
    for node in got.missing:
        out[node] = f"no reply within {request_timeout:g}s"
    return dict(sorted(out.items()))
