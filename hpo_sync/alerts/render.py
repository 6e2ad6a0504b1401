"""Render a digest of alerts into each target type's message body (pure).

A digest that does not fit one message is split into several, at most ``max_messages`` a
delivery round; what does not fit those is in no message and stays pending for the next
round, so a backlog goes out in full, paced by the target's rate limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any
from urllib.parse import quote

#: The message size limits, and whether they count characters or UTF-8 bytes of the JSON body
#: ("json") or of the text ("text").
LIMITS: dict[str, tuple[int, str]] = {
    "slack": (40_000, "chars"),
    "discord": (2_000, "chars"),
    "dingtalk": (20_000, "json"),
    "feishu": (20_000, "json"),
    "lark": (20_000, "json"),
    "wecom": (4_096, "bytes"),
    "teams": (28_000, "json"),
    "webhook": (1_000_000, "json"),
}
#: Bytes a target's request adds to the rendered payload after rendering: Feishu/Lark's
#: signature fields (``"timestamp":"…","sign":"<44 base64>"``, about 80 bytes) go into the
#: body that its 20 KB limit counts.
SIGNING_ROOM: dict[str, int] = {"feishu": 96, "lark": 96}
MAX_MESSAGES = 3
TITLE = "hpo-sync alerts"


@dataclass(frozen=True)
class AlertItem:
    """One alert as messages show it."""

    outbox_id: int
    rule: str
    workspace_id: str
    experiment_id: str
    name: str | None
    field: str
    old_value: str | None
    new_value: str | None
    observed_at: str
    trial_status: Mapping[str, int] = dc_field(default_factory=dict)
    failed_delta: int = 0
    workspace_label: str | None = None
    console_url: str = ""

    @property
    def transition(self) -> str:
        if self.field == "Deleted":
            return "deleted" if self.new_value == "true" else "restored"
        if self.field == "TrialStatus":
            return f"trials changed (FAILED {self.failed_delta:+d})"
        return _text(f"{self.old_value or 'new'} → {self.new_value or '?'}")

    @property
    def trials(self) -> str:
        if not self.trial_status:
            return "no trials"
        return _text(", ".join(f"{k} {v}" for k, v in sorted(self.trial_status.items())))

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": self.workspace_id,
            "experiment_id": self.experiment_id,
            "name": self.name,
            "field": self.field,
            "from": self.old_value,
            "to": self.new_value,
            "trial_status": dict(self.trial_status),
            "observed_at": self.observed_at,
            "console_url": self.console_url,
            "rule": self.rule,
        }


def console_link(template: str, region: str, workspace: str, experiment_id: str) -> str:
    """The template filled in; ids percent-encoded, so that one holding ``|`` or ``>``
    cannot end a chat link early and make the rest of it text."""
    return template.format(
        region=region,
        workspace=quote(workspace, safe=""),
        experiment_id=quote(experiment_id, safe=""),
    )


# What upstream (or a config) puts in a message is data, not markup. These characters would
# let an experiment's name close its code span, mention people (Slack's <!channel>, Discord's
# @everyone, Feishu's <at id=all>, WeCom's <@all>), add a link or an image that loads from
# anywhere ([text](url), ![x](url): DingTalk and Teams have no code spans to hold a name, and
# an id is shown outside one everywhere), set text bold or struck through, or start a heading
# on a line of its own; each becomes a look-alike that no target reads as markup. Not "_":
# names are full of it, and between letters no target reads it as emphasis.
_NEUTRAL = str.maketrans(
    {
        "`": "\u02cb",
        "<": "\u2039",
        ">": "\u203a",
        "@": "\uff20",
        "[": "\uff3b",
        "]": "\uff3d",
        "*": "\u2217",
        "~": "\u223c",
        "\n": " ",
        "\r": " ",
    }
)
#: Characters of a name shown in a line: a longer one is cut here, so that the experiment's
#: id, workspace and link still fit a message (a line too long for one is cut at its end).
MAX_NAME_CHARS = 200


def _text(value: object) -> str:
    return str(value).translate(_NEUTRAL)


def _name(item: AlertItem) -> str:
    name = _text(item.name or item.experiment_id)
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


@dataclass(frozen=True)
class Message:
    """One request body and the outbox rows it announces (listed, or counted in "… and N
    more" by a message sent again that no longer fits: see :func:`form_messages`)."""

    payload: dict[str, Any]
    outbox_ids: tuple[int, ...]


def _ws(item: AlertItem) -> str:
    return _text(
        f"{item.workspace_label} ({item.workspace_id})"
        if item.workspace_label
        else item.workspace_id
    )


def _md_line(item: AlertItem, link: Callable[[str, str], str], code: str = "`") -> str:
    exp = f"{code}{_name(item)}{code} ({_text(item.experiment_id)})"
    return (
        f"- **{item.transition}** · {exp} · workspace {_ws(item)} · trials: {item.trials}"
        f" · {_text(item.observed_at)} · rule {_text(item.rule)}"
        f" · {link('console', item.console_url)}"
    )


def _slack_line(item: AlertItem) -> str:
    # Slack reads &amp; &lt; &gt; as entities: a name holding "&lt;" would show "<".
    exp = _amp(f"`{_name(item)}` ({_text(item.experiment_id)})")
    return (
        f"• *{_amp(item.transition)}* · {exp} · workspace {_amp(_ws(item))} · trials:"
        f" {_amp(item.trials)} · {_amp(_text(item.observed_at))} · rule {_amp(_text(item.rule))}"
        f" · <{item.console_url}|console>"
    )


def _amp(text: str) -> str:
    return text.replace("&", "&amp;")


def _md_link(text: str, url: str) -> str:
    return f"[{text}]({url})"


def _teams_link(text: str, url: str) -> str:
    return f"[{text}]({url})"


def _heading(n: int, keyword: str | None) -> str:
    head = f"{TITLE}: {n} change{'s' if n != 1 else ''}"
    if keyword and keyword not in head:
        head = f"{head} [{keyword}]"
    return head


def _payload(target_type: str, lines: Sequence[str], head: str) -> dict[str, Any]:
    if target_type == "slack":
        return {"text": "\n".join([f"*{head}*", *lines])}
    if target_type == "discord":
        # Mentions are never parsed, whatever a line holds: no alert pings anyone.
        return {
            "content": "\n".join([f"**{head}**", *lines]),
            "allowed_mentions": {"parse": []},
        }
    if target_type == "dingtalk":
        return {
            "msgtype": "markdown",
            "markdown": {"title": head, "text": "\n".join([f"### {head}", "", *lines])},
        }
    if target_type in ("feishu", "lark"):
        return {
            "msg_type": "interactive",
            "card": {
                "config": {"wide_screen_mode": True},
                "header": {"title": {"tag": "plain_text", "content": head}},
                "elements": [
                    {"tag": "div", "text": {"tag": "lark_md", "content": "\n".join(lines)}}
                ],
            },
        }
    if target_type == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": "\n".join([f"**{head}**", *lines])}}
    if target_type == "teams":
        body: list[dict[str, Any]] = [
            {"type": "TextBlock", "text": head, "weight": "Bolder", "size": "Medium", "wrap": True}
        ]
        body.extend({"type": "TextBlock", "text": line, "wrap": True} for line in lines)
        return {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": body,
                    },
                }
            ],
        }
    raise ValueError(f"unknown target type {target_type!r}")


def _text_of(target_type: str, payload: Mapping[str, Any]) -> str:
    if target_type == "slack":
        return str(payload["text"])
    if target_type == "discord":
        return str(payload["content"])
    if target_type == "dingtalk":
        return str(payload["markdown"]["text"])
    if target_type == "wecom":
        return str(payload["markdown"]["content"])
    return ""


def size_of(target_type: str, payload: Mapping[str, Any]) -> int:
    """The payload's size as the target counts it against :data:`LIMITS`."""
    _, unit = LIMITS[target_type]
    if unit == "json":
        return len(json.dumps(payload, ensure_ascii=False).encode())
    text = _text_of(target_type, payload)
    return len(text) if unit == "chars" else len(text.encode())


def _line(target_type: str, item: AlertItem) -> str:
    if target_type == "slack":
        return _slack_line(item)
    return _md_line(item, _md_link)


def _cut_to_fit(target_type: str, line: str, head: str, limit: int) -> str:
    """The longest prefix of ``line`` (plus "…") whose message fits ``limit`` as the target
    counts it: in UTF-8 bytes or JSON-escaped bytes where it counts those, so a line of CJK
    text or of characters JSON escapes is cut short enough too, not merely to a character
    count."""

    def fits(n: int) -> bool:
        return size_of(target_type, _payload(target_type, [line[:n] + "…"], head)) <= limit

    lo, hi = 0, len(line)  # fits(lo) is assumed: the heading alone fits every limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return line[:lo] + "…"


def _more(n: int) -> str:
    return f"… and {n} more"


def render(
    target_type: str,
    items: Sequence[AlertItem],
    *,
    keyword: str | None = None,
    max_messages: int = MAX_MESSAGES,
) -> list[Message]:
    """Messages announcing ``items``, at most ``max_messages``: every item is in at most one
    message's ``outbox_ids``, and those past the last message (in order) are in none; the
    caller leaves them pending for its next round.

    Each message is rendered from its own items alone (:func:`render_message`), its heading
    counting them: a message sent again later is rendered again from the same items, and
    comes out the same."""
    planned = _pack(target_type, items, keyword, max_messages, defer_rest=True)
    if len(planned) == 1 and len(planned[0].outbox_ids) == len(items):  # from these alone
        return planned
    out: list[Message] = []
    start = 0
    for message in planned:  # _pack takes the items in order
        end = start + len(message.outbox_ids)
        out.append(render_message(target_type, items[start:end], keyword=keyword))
        start = end
    return out


def render_message(
    target_type: str, items: Sequence[AlertItem], *, keyword: str | None = None
) -> Message:
    """``items`` (not empty) as one message, as :func:`render` renders a message that holds
    them: what does not fit is cut to fit or counted in "… and N more". The same items give
    the same message, so a retry announces the same alerts in the same words."""
    (message,) = _pack(target_type, items, keyword, 1)
    return message


def _pack(
    target_type: str,
    items: Sequence[AlertItem],
    keyword: str | None,
    max_messages: int,
    *,
    defer_rest: bool = False,
) -> list[Message]:
    """Fill messages with ``items`` in order, as many as fit each, under a heading counting
    all of ``items``. What does not fit ``max_messages`` is left out (``defer_rest``) or
    counted in "… and N more" at the end of the last one."""
    if not items:
        return []
    if target_type == "webhook":
        return [
            Message(
                {"type": "hpo-sync.changes", "alerts": [i.to_json() for i in items]},
                tuple(i.outbox_id for i in items),
            )
        ]
    limit, _ = LIMITS[target_type]
    limit -= 64 + SIGNING_ROOM.get(target_type, 0)  # the "… and N more" line, the signature
    total = len(items)
    head = _heading(total, keyword)
    messages: list[Message] = []
    i = 0
    while i < total:
        last = len(messages) == max_messages - 1
        lines: list[str] = []
        ids: list[int] = []
        while i < total:
            line = _line(target_type, items[i])
            candidate = [*lines, line]
            if size_of(target_type, _payload(target_type, candidate, head)) > limit:
                if not lines:  # one item alone is too big: cut its line to fit
                    lines, ids = [_cut_to_fit(target_type, line, head, limit)], [items[i].outbox_id]
                    i += 1
                break
            lines, ids = candidate, [*ids, items[i].outbox_id]
            i += 1
        if last and i < total and not defer_rest:
            rest = items[i:]
            lines.append(_more(len(rest)))
            ids.extend(r.outbox_id for r in rest)
            i = total
        messages.append(Message(_payload(target_type, lines, head), tuple(ids)))
        if last:
            break
    return messages


@dataclass(frozen=True)
class Formed:
    """A message of a delivery round: ``message_id`` names the message if it was formed (and
    perhaps sent) before, else it is new and still to be named."""

    message: Message
    message_id: str | None


def form_messages(
    target_type: str,
    items: Sequence[AlertItem],
    message_ids: Mapping[int, str | None],
    *,
    keyword: str | None = None,
) -> list[Formed]:
    """The messages that announce ``items`` (one target's due alerts, oldest first), in the
    order of their first item.

    Items whose row already names a message (``message_ids``, by outbox id) go as that
    message again, rendered from the same items in the same order; new items never join it.
    The others are grouped afresh (:func:`render`) into new messages."""
    stored: dict[str, list[AlertItem]] = {}
    fresh: list[AlertItem] = []
    for item in items:
        message_id = message_ids.get(item.outbox_id)
        if message_id is None:
            fresh.append(item)
        else:
            stored.setdefault(message_id, []).append(item)
    formed: list[Formed] = []
    for message_id, group in stored.items():
        message = render_message(target_type, group, keyword=keyword)
        if message.outbox_ids == tuple(i.outbox_id for i in group):
            formed.append(Formed(message, message_id))
        else:
            # No longer one message holding exactly these alerts: fall back to grouping them
            # afresh, under new ids, rather than send an id that does not describe its
            # message. The present renderer never gets here: render_message counts in
            # "… and N more" what does not fit (a message of an earlier version's digest may
            # hold such a count), so a message whose target's type or keyword changed since
            # still goes whole under its id. Regrouped, its alerts would reach a receiver
            # that already has them again, under new ids; and a message that overflowed
            # when it was formed cannot be told from one that overflows only now.
            fresh.extend(group)
    fresh.sort(key=lambda i: i.outbox_id)
    formed.extend(Formed(m, None) for m in render(target_type, fresh, keyword=keyword))
    formed.sort(key=lambda f: f.message.outbox_ids[0])
    return formed


def render_notice(
    target_type: str,
    workspace_id: str,
    label: str | None,
    state: str,
    last_success_at: str | None,
    *,
    keyword: str | None = None,
) -> dict[str, Any]:
    """The message for a workspace that stopped syncing (``stalled``) or recovered."""
    if target_type == "webhook":
        return {
            "type": "hpo-sync.workspace",
            "workspace": workspace_id,
            "state": state,
            "last_success_at": last_success_at,
        }
    name = _text(f"{label} ({workspace_id})" if label else workspace_id)
    if state == "stalled":
        line = (
            f"workspace {name} has not synced successfully since {last_success_at}"
            if last_success_at
            else f"workspace {name} has not synced successfully yet"
        )
    else:
        line = f"workspace {name} syncs again (last success {last_success_at or 'unknown'})"
    head = f"hpo-sync: workspace {state}"
    if keyword and keyword not in head:
        head = f"{head} [{keyword}]"
    return _payload(target_type, [line], head)
