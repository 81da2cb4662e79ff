"""A synthetic high-resolution VQA task on which a small LLaVA-NeXT is trained and pruning is scored.

Scenes hold several small coloured shapes on textured clutter; questions name a shape and ask for its
colour, its presence in a given colour, its count or its side of the image.  The objects are sized so
that the anyres tiles resolve their shape while the 336-px global view does not.
"""

from .scenes import (
    ANSWER_WORDS,
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    Question,
    Scene,
    SceneObject,
    make_questions,
    make_scene,
    move_object,
    proxy_words,
    split_seed,
)

__all__ = [
    "ANSWER_WORDS",
    "COLOURS",
    "QUESTION_TYPES",
    "SHAPES",
    "Question",
    "Scene",
    "SceneObject",
    "make_questions",
    "make_scene",
    "move_object",
    "proxy_words",
    "split_seed",
]
