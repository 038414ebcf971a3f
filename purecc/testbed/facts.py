"""What a prompt of the toy world asks for, as position-keyed facts.

A fact is ``"<position>.<attribute>" -> value`` (attribute: shape, color, pattern, size) or
``"background" -> value``. Positions, not object order, key the facts, because two objects
of a caption can stand in either order and only their positions are visible in the image.

``caption_facts`` parses the world's caption grammar (world.Scene.caption) and concept
captions ("a zqx star on the left, on a grid background"), including compositions of several
phrases joined by "and". A word that is not world vocabulary (a trigger such as ``zqx`` or the
placeholder ``[v]``) marks its object as a concept: only the attributes the phrase names are
facts, and ``concept_positions`` finds where such an object stands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .world import (BACKGROUNDS, COLORS, COUNT_POSITIONS, COUNTS, PATTERNS, POSITION_PHRASES,
                     RELATION_POSITIONS, SHAPE_PLURALS, SHAPES, SIZES, Scene)

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "pattern", "size")
_PLURAL_TO_SHAPE = {plural: shape for shape, plural in SHAPE_PLURALS.items()}
_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}
_BACKGROUND_TAIL = re.compile(r"^(?P<body>.*?),? on an? (?P<bg>[a-z ]+?) background$")


@dataclass(frozen=True)
class ObjectPhrase:
    """One object named by a prompt: where it stands, its stated attributes, its other words."""

    position: str
    attributes: tuple[tuple[str, str], ...]   # (attribute, value), stated ones only
    unknown: tuple[str, ...]                  # words outside the world vocabulary (triggers)


def scene_facts(scene: Scene) -> dict[str, str]:
    """Every attribute of every object of ``scene`` and its background."""
    facts = {"background": scene.background}
    for obj in scene.objects:
        for attr in ATTRIBUTES:
            facts[f"{obj.position}.{attr}"] = getattr(obj, attr)
    return facts


def _phrase(words: list[str], position: str, plural: bool = False) -> ObjectPhrase:
    attrs, unknown = {}, []
    for word in words:
        if word in SIZES:
            attrs["size"] = word
        elif word in COLORS:
            attrs["color"] = word
        elif word in PATTERNS:
            attrs["pattern"] = word
        elif not plural and word in SHAPES:
            attrs["shape"] = word
        elif plural and word in _PLURAL_TO_SHAPE:
            attrs["shape"] = _PLURAL_TO_SHAPE[word]
        else:
            unknown.append(word)
    if not unknown and "shape" in attrs:
        attrs.setdefault("pattern", "solid")  # an ordinary object's unnamed pattern is solid
    return ObjectPhrase(position, tuple(sorted(attrs.items())), tuple(unknown))


def _strip_article(text: str, prompt: str) -> list[str]:
    words = text.split()
    if not words or words[0] not in ("a", "an"):
        raise ValueError(f"prompt: {prompt!r}: expected 'a <object>' in {text!r}")
    return words[1:]


def parse_prompt(prompt: str) -> tuple[str, list[ObjectPhrase]]:
    """(background, objects) of a world or concept prompt; ValueError naming it otherwise."""
    m = _BACKGROUND_TAIL.match(" ".join(prompt.lower().split()))
    if m is None or m.group("bg") not in BACKGROUNDS:
        raise ValueError(f"prompt: {prompt!r} does not end with 'on a <background> background' "
                         f"(backgrounds: {BACKGROUNDS})")
    background, body = m.group("bg"), m.group("body")
    words = body.split()
    if words and words[0] in COUNTS[1:]:
        n = COUNTS.index(words[0]) + 1
        return background, [_phrase(words[1:], pos, plural=True) for pos in COUNT_POSITIONS[n]]
    for relation, (first, second) in RELATION_POSITIONS.items():
        left, sep, right = body.partition(f" {relation} ")
        if sep:
            return background, [_phrase(_strip_article(left, prompt), first),
                                _phrase(_strip_article(right, prompt), second)]
    objects = []
    for part in body.split(" and "):
        for phrase, pos in _PHRASE_TO_POSITION.items():
            if part.endswith(" " + phrase):
                objects.append(_phrase(_strip_article(part[: -len(phrase) - 1], prompt), pos))
                break
        else:
            raise ValueError(f"prompt: {prompt!r}: no position phrase in {part!r} "
                             f"(expected one of {tuple(_PHRASE_TO_POSITION)})")
    if len({o.position for o in objects}) != len(objects):
        raise ValueError(f"prompt: {prompt!r} puts two objects at the same position")
    return background, objects


def caption_facts(prompt: str) -> dict[str, str]:
    """The facts a prompt asks for; equals ``scene_facts(scene)`` for ``scene.caption()``."""
    background, objects = parse_prompt(prompt)
    facts = {"background": background}
    for obj in objects:
        for attr, value in obj.attributes:
            facts[f"{obj.position}.{attr}"] = value
    return facts


def concept_positions(prompt: str, trigger: str) -> list[str]:
    """Positions of the objects whose phrase carries ``trigger`` (e.g. 'zqx' or '[v]')."""
    _, objects = parse_prompt(prompt)
    return [o.position for o in objects if trigger.lower() in o.unknown]
