"""Tiny random-weight checkpoints of every model family, built from configs: for tests, demos, benchmarks
and the proxy trainer (nothing is downloaded).

One module a family, ``ptp_ros/testing/<model_type>.py``, registers its ``TinyFamily`` (config and
processor builders with toy widths and the real geometry) in ``common.FIXTURES``; ``FIXTURES[model_type]
.build(out_dir)`` saves a checkpoint that ``load_adapter`` reads like a user's.  What every family
shares is in one place: the tokens here (light, no torch or transformers), the word
tokenizer in ``tokenizer.py``, the random initialisation and the toy text config in ``common.py``.

This package may use the library; the library never imports it (``test/test_boundaries.py``).
"""

from __future__ import annotations

#: The special tokens every built-in tokenizer starts with, in id order.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
#: Their ids as a text config names them (pad 0, bos 2, eos 3).
TEXT_TOKEN_IDS = {
    "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
    "bos_token_id": SPECIAL_TOKENS.index("<s>"),
    "eos_token_id": SPECIAL_TOKENS.index("</s>"),
}

#: Words every built-in tokenizer knows: the chat template and a small everyday vocabulary.
BASE_WORDS = (
    "user assistant : ? . , ! ' - a an the is are was what which where how many any there this that of in on "
    "at to and or no yes not it its do does see can you me my i object objects thing things colour color shape "
    "size count left right top bottom middle center centre up down near far front behind big small large tiny "
    "red green blue yellow orange purple white black gray grey pink brown cyan circle square triangle star "
    "cross ring box cup bottle door person robot table chair floor wall zero one two three four five six seven "
    "eight nine ten pick place move go stop look find describe image picture scene camera"
).split()
