"""OpenRLHF with an illume reward service: the labels its prompt dataset needs, and the flags.

    illume reward serve runs/demo --token "$ILLUME_REWARD_TOKEN"          # then, in OpenRLHF:
    python -m openrlhf.cli.train_ppo_ray ... --data.label_key label \\
        --reward.remote_url "http://127.0.0.1:8770/openrlhf?token=$ILLUME_REWARD_TOKEN"
    (releases before the dotted flags: --label_key, --remote_rm_url)

What OpenRLHF sends (OpenRLHF/OpenRLHF at 3c3be62, 2026-08: openrlhf/utils/agent.py,
`SingleTurnAgentExecutor.execute` and `_fetch_rewards_via_http`): after each generation, an aiohttp POST of
`{"query": [tokenizer.decode(prompt ids + response ids, skip_special_tokens=False)], "prompts": [the prompt],
"labels": [the row's label_key value]}` to each remote URL (openrlhf/cli/train_ppo_ray.py splits the flag at
commas), without headers of its own (so the token goes in the URL's query), and it reads `rewards`, `scores`
(else `rewards`) and `extra_logs` from the answer. The service's POST /openrlhf takes exactly that: each label
is the item without its rationale (made here), the rationale is the query's text after its prompt.

    row["label"] = make_label(image, question, answer)     # for each row of the prompt dataset
"""

from __future__ import annotations

import base64
import io
import json


def make_label(image, question: str, answer: str) -> str:
    """The label of one prompt: a JSON string holding the image (a PIL image, sent as PNG, or an image file's
    bytes) as base64, the question and the answer the rationale is for."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return json.dumps({"image": base64.b64encode(data).decode(), "question": question, "answer": answer})
