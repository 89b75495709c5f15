"""qosroute_client: a device's client of the qosroute gateway (`qosrouted`) over MQTT.

    from qosroute_client import Client
    with Client("127.0.0.1", 1883, site="lab", device="dev-1") as c:
        answer = c.ask("What is the capital of France?", task="mmlu", max_tokens=32, slo=0.1)
        print(answer.text, answer.expert, answer.ttft_ms, answer.s_per_token, answer.slo_met)
"""

from .client import Answer, Client, ConnectError, QosrouteError, ReplyTimeout, Stats, Stream
from .wire import TASKS, Chunk, ErrorCode, Final

__all__ = [
    "Answer",
    "Chunk",
    "Client",
    "ConnectError",
    "ErrorCode",
    "Final",
    "QosrouteError",
    "ReplyTimeout",
    "Stats",
    "Stream",
    "TASKS",
]
