"""The tests' in-process Grid: the ServerApp's logic against the real ClientApp handlers, no Ray.

``InProcessGrid`` is a transport stand-in: it hands each message to the real ``train`` /
``evaluate`` handlers with one ``Context`` per node (whose ``state`` persists, as Flower's
does), so the strategy, the server run and the client code are the ones ``flwr run`` executes.
What it leaves out is Flower's transport and the Ray simulation engine: nodes run one after the
other, node ids are 1000 + partition id unless given, and replies arrive in sending order. Runs for
real go through Flower: ``make run`` / ``scripts/run.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmae_flwr import client_app
from fedmae_flwr.client import identify_reply

FIRST_NODE_ID = 1000


class InProcessGrid(Grid):
    """Delivers messages to the real ClientApp handlers in this process, one Context per node.

    ``sent`` keeps every train and evaluate message delivered, ``queries`` the key queries
    (answered by the real ``query`` handler); ``tamper`` (tests) may replace each train or
    evaluate reply. ``node_ids`` (default ``1000 + partition id``) stand in for the random ids
    a Flower simulation draws.
    Its nodes train on the partitions the server computes (``simulated_partitions``), as in a
    Flower simulation, so the server may cap ``num-examples`` at the largest one.
    """

    simulated_partitions = True

    def __init__(
        self,
        num_nodes: int,
        overrides: dict[str, Any],
        run_config: dict | None = None,
        node_ids: list[int] | None = None,
    ) -> None:
        self.overrides = overrides
        # Messages take their sender's identity from the process, as inside a ServerApp.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        node_ids = node_ids or [FIRST_NODE_ID + i for i in range(num_nodes)]
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_id in enumerate(node_ids[:num_nodes])
        }
        self.sent: list[Message] = []
        self.queries: list[Message] = []
        self.tamper: Callable[[Message], Message] | None = None

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used by strategies
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError("InProcessGrid has no Flower run")

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError("strategies build their messages with Message(...)")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError("InProcessGrid only answers send_and_receive")

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError("InProcessGrid only answers send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            context = self.contexts[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.QUERY:
                self.queries.append(msg)
                replies.append(identify_reply(msg, context))
                continue
            self.sent.append(msg)
            handler = (
                client_app.train if msg.metadata.message_type == MessageType.TRAIN
                else client_app.evaluate
            )  # fmt: skip
            reply = handler(msg, context, self.overrides)
            replies.append(self.tamper(reply) if self.tamper else reply)
        return replies


def run_in_process(overrides: dict[str, Any], num_nodes: int) -> dict[str, Any]:
    """The whole run (``server_app.run``) over ``num_nodes`` in-process nodes; its summary.

    No node can join later here: the ServerApp's own check of a simulation's node count
    (:mod:`fedmae_flwr.simulation_nodes`) refuses a config that would wait for more.
    """
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.server_app import run

    return run(InProcessGrid(num_nodes, overrides), resolve_config(overrides))
