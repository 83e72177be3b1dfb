"""Text formats shared by the dialogue and summarization tasks.

Dialogue transcript (speakers are labelled by their position in the whole conversation, so the
first speaker is always "A" even when the context window starts later):

    Topic: What if pigs could fly?
    A: hi there
    B: hey! did you see the prompt?
    A:

A prompt ends with the next speaker's tag and a colon, and every response starts with the space that
follows that colon (" sure, ..."). Why: SentencePiece (add_dummy_prefix=False) then tokenizes
prompt + response exactly as it tokenizes the two encoded separately, so the ids a policy samples
after a prompt are the ids the reward model sees for the joined text. A response of several turns
continues the transcript: " t1\\nB: t2\\nA: t3". Newlines inside an utterance are replaced by
spaces because a newline separates turns.
"""

from __future__ import annotations

from collections.abc import Sequence

SPEAKERS = ("A", "B")
TOPIC_TAG = "Topic: "  # a dialogue prompt's first line: the tag, then the starter topic
SUMMARIZATION_INSTRUCTION = "Summarize the article in one sentence."


def speaker(turn_index: int) -> str:
  """Tag of the speaker of turn `turn_index` (0-based, counted from the conversation's start)."""
  return SPEAKERS[turn_index % 2]


def clean_utterance(text: str) -> str:
  """One line of text: newlines (the turn separator) become spaces."""
  return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def dialogue_prompt(topic: str, context_turns: Sequence[str], first_turn_index: int) -> str:
  """Prompt for the turn after `context_turns`; `first_turn_index` is the index of context_turns[0].

  `topic` may be '' (no topic line).
  """
  lines = [f"{TOPIC_TAG}{topic}"] if topic else []
  lines += [f"{speaker(first_turn_index + k)}: {turn}" for k, turn in enumerate(context_turns)]
  lines.append(f"{speaker(first_turn_index + len(context_turns))}:")
  return "\n".join(lines)


def dialogue_response(turns: Sequence[str], first_turn_index: int) -> str:
  """Response text continuing a prompt whose last tag is speaker(first_turn_index)."""
  if not turns:
    raise ValueError("turns is empty; a response needs at least one turn")
  later = [f"\n{speaker(first_turn_index + k)}: {turn}" for k, turn in enumerate(turns) if k > 0]
  return " " + turns[0] + "".join(later)


def conversation_text(prompt: str, response: str) -> str:
  """The turns of prompt + response after the topic line and the first speaker's tag: the text a chitchat
  preference pair's response holds (its prompt is `dialogue_prompt(topic, (), 0)`, the topic line and that
  tag), and so what a text reward fitted on those responses must read.

  A distillation prompt with k opening turns and its sampled response give the same text as the pair's
  response of those turns: "Topic: X\\nA: t0\\nB:" + " t1\\nA: t2" -> " t0\\nB: t1\\nA: t2". Read alone, the
  response would lose the opening turn and the "B:" tag that the pair's text always holds, and a tag
  would then mean a later turn than it meant in the pairs.
  """
  text = prompt + response
  if text.startswith(TOPIC_TAG):
    newline = text.find("\n")
    text = "" if newline < 0 else text[newline + 1:]
  first = f"{speaker(0)}:"
  return text[len(first):] if text.startswith(first) else text


def summarization_prompt(document: str, max_document_chars: int) -> str:
  """Prompt asking for a one-sentence summary; the document is cut to `max_document_chars`.

  Cutting characters (before tokenizing) keeps the instruction and the "Summary:" tag intact, which a
  token-level left truncation would drop.
  """
  if max_document_chars <= 0:
    raise ValueError(f"max_document_chars={max_document_chars} must be positive")
  return f"{SUMMARIZATION_INSTRUCTION}\n\nArticle: {document[:max_document_chars]}\n\nSummary:"


def summarization_response(summary: str) -> str:
  """Response text: the summary after the space that follows "Summary:"."""
  return " " + summary.strip()
