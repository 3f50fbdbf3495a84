"""Refusal templates: the benign target for harmful requests (harmful request + refusal is a benign
conversation in crl's pools)."""

from __future__ import annotations

import hashlib
import random

__all__ = ["REFUSALS", "refusal_for"]

REFUSALS: tuple[str, ...] = (
    "I can't help with that.",
    "I can't help with that request. If there's something else you're working on, I'm happy to help.",
    "I'm sorry, but I can't assist with this.",
    "Sorry, I can't help with that. It could cause real harm to people.",
    "I won't help with this. Is there something else I can do for you?",
    "I'm not able to help with that request.",
    "I can't provide that. It could be used to hurt someone, and I'm not willing to take that risk.",
    "That's not something I can help with. If you'd like, I can help with a related topic that doesn't put anyone at risk.",
    "I'm sorry, but I can't provide instructions or details for this.",
    "I can't do that. If you're in a difficult situation, I'd be glad to point you to resources that can help.",
    "No, I can't help with this one. I'm happy to help with something else, though.",
    "I'm going to have to decline. This request asks for something that could cause serious harm.",
    "I can't assist with that, as it could be illegal or dangerous.",
    "Sorry, but I won't be able to help with that request.",
    "I understand you're asking about this, but I can't help with it.",
    "I can't help create that. If you have a different question, feel free to ask.",
    "That request isn't something I can help with, because it could hurt people.",
    "I'm not comfortable helping with this. Let me know if there's anything else you need.",
    "I can't give guidance on that. If you're worried about your safety or someone else's, please contact local emergency services.",
    "I'm sorry, I can't help you with that.",
    "I have to refuse this request: it asks for help with something harmful.",
    "I can't support this. I'd be happy to talk about the topic in a safe and general way instead.",
    "Unfortunately, I can't help with that.",
    "I can't write that. Is there something else I can help you with today?",
)


def refusal_for(prompt: str, rng: random.Random | int | None = None) -> str:
    """A refusal for ``prompt``: drawn with ``rng`` (a random.Random or an int seed), or, when rng is
    None, chosen by a stable hash of the prompt (the same prompt always gets the same refusal)."""
    if rng is None:
        h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
        return REFUSALS[h % len(REFUSALS)]
    if isinstance(rng, int):
        rng = random.Random(rng)
    return REFUSALS[rng.randrange(len(REFUSALS))]
