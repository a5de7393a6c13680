"""LangChain models that run kvflow's engine in-process.

``VLLM`` takes exactly the fields of ``langchain_community.llms.VLLM``, so code
written for it runs with only the import line changed; ``ChatKVFlow`` is a chat
model that renders messages with the model's own chat template.

langchain-core is an optional extra: without it this import fails with the
command that installs it, instead of a bare ModuleNotFoundError deep inside.
"""

try:
    import langchain_core  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "kvflow.integrations.langchain needs langchain-core, which is not installed. "
        'Install it with: pip install "kvflow[langchain]"'
    ) from exc

from kvflow.integrations.langchain.chat_models import ChatKVFlow
from kvflow.integrations.langchain.llms import VLLM

__all__ = ["VLLM", "ChatKVFlow"]
