"""Ray Serve LLM's `PrefixCacheAffinityRouter` in front of our replicas (`ingress.prefix_affinity.router: ray`).

Ray's router finds a request's prompt by attribute (`arg.prompt` / `arg.messages`, as on Ray Serve LLM's request
models) and fails on anything else; our engine requests are dicts, and a resumed one carries only token ids.
This subclass reads those (text and messages normalized by Ray's own code, token ids as text) and changes
nothing else. It comes from Ray's internal module: the public alias `ray.serve.llm.request_router` also imports
ray[llm]'s cloud-storage helpers (pyarrow), which this project does not install.
"""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve.request_router import PendingRequest


class RayPrefixCacheRouter(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request: PendingRequest) -> str:
        for arg in [*pending_request.args, *pending_request.kwargs.values()]:
            if not isinstance(arg, dict):
                continue
            for name in ("messages", "prompt"):
                if arg.get(name):
                    return self._normalize_prompt_to_string(arg[name]) or " "
            if arg.get("prompt_token_ids"):
                return " ".join(map(str, arg["prompt_token_ids"]))
        # Ray's router divides by the text's length: a request without a prompt matches nothing, harmlessly.
        return " "
