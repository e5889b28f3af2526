"""Data profiles: the registry, each profile's row transform (deterministic by index), its prompt and rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from libs.common.chat import ChatMessage, ChatRow
from libs.common.profiles import (
    ANS_END,
    ANS_START,
    PROFILES,
    STOP_EMOJIS,
    THINKING_EMOJIS,
    GenerationRules,
    UnknownProfile,
    apply_profile,
    get_profile,
    with_system_prompt,
)


def row(*turns: tuple[str, str]) -> ChatRow:
    return ChatRow(messages=[ChatMessage(role, content) for role, content in turns])


SUM = row(("user", "Add ①⓪ ①①"), ("assistant", "add ①⓪ ①① = ①⓪①"))
WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
STOP_WORDS = {"twice": 2, "three times": 3, "four times": 4}
ROOT = Path(__file__).resolve().parents[3]


def test_the_registry_names_three_profiles_and_an_unknown_name_lists_them():
    assert list(PROFILES) == ["none", "emoji_think", "regime3"]
    assert get_profile("regime3").name == "regime3"
    with pytest.raises(UnknownProfile, match=r"unknown profile 'emoji'; known: none, emoji_think, regime3"):
        get_profile("emoji")
    with pytest.raises(UnknownProfile):
        apply_profile([SUM], "nope")


def test_none_changes_nothing():
    rows = [SUM, row(("system", "Be exact."), ("user", "hi"), ("assistant", "<think>x</think>hello"))]
    assert apply_profile(rows, "none") == rows
    none = get_profile("none")
    assert none.system_prompt == "" and none.rules == GenerationRules() and none.rules.neutral
    assert none.prompted(SUM.messages) == SUM.messages and none.answer(" x ") == " x "


def test_a_system_prompt_goes_first_in_the_rows_own_system_message_or_a_new_one():
    assert with_system_prompt(SUM.messages, "P") == [ChatMessage("system", "P"), *SUM.messages]
    own = [ChatMessage("system", "Be exact."), *SUM.messages]
    assert with_system_prompt(own, "P") == [ChatMessage("system", "P\n\nBe exact."), *SUM.messages]
    assert with_system_prompt(own, "") == own


# ---------------------------------------------------------------------------- emoji_think


def test_emoji_think_gives_exactly_one_row_of_each_pair_the_protocol():
    profile = get_profile("emoji_think")
    planned = [profile.plan(i) is not None for i in range(1000)]
    assert sum(planned) == 500
    assert all(planned[2 * k] != planned[2 * k + 1] for k in range(500))
    # Chosen by a hash, not by parity: both members of a pair get picked somewhere.
    assert 100 < sum(planned[0::2]) < 400


def test_emoji_think_transforms_a_row_exactly_as_the_seed_system_describes():
    profile = get_profile("emoji_think")
    rows = [row(("user", "Add ①⓪ ①①"), ("assistant", "<think>carry the one</think>\n\nadd ①⓪ ①① = ①⓪①"))] * 40
    for index, out in enumerate(apply_profile(rows, "emoji_think")):
        system, user, assistant = out.messages
        assert system == ChatMessage("system", profile.system_prompt)
        assert "<think>" not in assistant.content and "</think>" not in assistant.content
        plan = profile.plan(index)
        if plan is None:
            assert user.content == "Add ①⓪ ①①" and assistant.content == "carry the one\n\nadd ①⓪ ①① = ①⓪①"
            continue
        think = re.fullmatch(r"Add ①⓪ ①①\n\nFor this task, think with (\S+) /(\w+)/ times\.\n"
                             r"When finished, emit (\S+) /([\w ]+)/ to signal completion\.", user.content)
        assert think, user.content
        emoji, count, stop, stop_count = think[1], WORDS[think[2]], think[3], STOP_WORDS[think[4]]
        assert emoji in THINKING_EMOJIS and 2 <= count <= 8 and stop in STOP_EMOJIS and 2 <= stop_count <= 4
        assert assistant.content == f"{emoji * count}\ncarry the one\n\nadd ①⓪ ①① = ①⓪①\n{stop * stop_count}"


def test_emoji_think_uses_every_emoji_and_count_of_its_pools():
    profile = get_profile("emoji_think")
    plans = [p for i in range(4000) if (p := profile.plan(i)) is not None]
    assert {p.think for p in plans} == set(THINKING_EMOJIS) and {p.stop for p in plans} == set(STOP_EMOJIS)
    assert {p.think_count for p in plans} == set(range(2, 9)) and {p.stop_count for p in plans} == {2, 3, 4}


def test_emoji_think_instructs_every_user_turn_and_wraps_every_answer_of_a_planned_row():
    profile = get_profile("emoji_think")
    index = next(i for i in range(10) if profile.plan(i) is not None)
    plan = profile.plan(index)
    conversation = row(("system", "Be exact."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    [out] = apply_profile([conversation], "emoji_think", start=index)
    assert out.messages[0].content == f"{profile.system_prompt}\n\nBe exact."
    assert [m.content for m in out.messages[1:]] == [
        f"a\n\n{plan.instruction}", f"{plan.prefix}b{plan.suffix}", f"c\n\n{plan.instruction}", f"{plan.prefix}d{plan.suffix}",
    ]


def test_a_transform_depends_on_the_row_and_its_index_alone():
    rows = [row(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(50)]
    whole = apply_profile(rows, "emoji_think")
    # In chunks with their start index, in another process (another hash seed): the same rows.
    assert apply_profile(rows[:20], "emoji_think") + apply_profile(rows[20:], "emoji_think", start=20) == whole
    script = ("import msgspec; from libs.common.chat import ChatRow, ChatMessage as M; "
              "from libs.common.profiles import apply_profile; "
              "rows = [ChatRow([M('user', f'q{i}'), M('assistant', f'a{i}')]) for i in range(50)]; "
              "print(msgspec.json.encode(apply_profile(rows, 'emoji_think')).decode())")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=ROOT, env={"PYTHONHASHSEED": "123"})
    assert msgspec.json.decode(other.stdout, type=list[ChatRow]) == whole


def test_emoji_think_answer_drops_the_thinking_line_and_the_stop_signal():
    profile = get_profile("emoji_think")
    assert profile.answer("🤔🤔🤔\nadd ①⓪ ①① = ①⓪①\n🛑🛑") == "add ①⓪ ①① = ①⓪①"
    assert profile.answer("⏹⏹ add ① ① = ①⓪ ⏹️⏹️") == "⏹⏹ add ① ① = ①⓪"  # a stop emoji does not start a thought
    assert profile.answer("add ① ① = ①⓪") == "add ① ① = ①⓪"


def test_emoji_think_rules_penalise_think_and_stop_after_any_stop_emoji_twice():
    rules = get_profile("emoji_think").rules
    assert rules.think_tags == ("<think>", "</think>") and rules.think_penalty > 0 and not rules.neutral
    assert {"🛑🛑", "⏹️⏹️", "⏹⏹", "🛡🛡"} <= set(rules.stop_sequences)
    assert rules.post_stop_penalty > 0 and rules.post_stop_escalation > 1 and rules.eos_reward > 0


# ---------------------------------------------------------------------------- regime3


def test_regime3_wraps_answers_in_markers_adding_only_the_missing_ones():
    profile = get_profile("regime3")
    rows = [
        row(("user", "What is 2 + 3?"), ("assistant", "(add 2 3) = 5")),
        row(("user", "q"), ("assistant", f"{ANS_START} (add 2 3) = 5 {ANS_END}")),
        row(("user", "q"), ("assistant", f"(sub 5 3) = 2 {ANS_END}")),
        row(("user", "q"), ("assistant", f"Step: (mul 2 2) = 4\n{ANS_START} (mul 2 2) = 4")),
    ]
    out = apply_profile(rows, "regime3")
    assert [r.messages[-1].content for r in out] == [
        f"{ANS_START} (add 2 3) = 5 {ANS_END}", f"{ANS_START} (add 2 3) = 5 {ANS_END}",
        f"{ANS_START} (sub 5 3) = 2 {ANS_END}", f"Step: (mul 2 2) = 4\n{ANS_START} (mul 2 2) = 4 {ANS_END}",
    ]
    assert all(r.messages[0] == ChatMessage("system", profile.system_prompt) for r in out)
    assert "(op arg1 arg2)" in profile.system_prompt and ANS_START in profile.system_prompt
    assert out[0].messages[1] == rows[0].messages[0]  # user turns untouched
    assert apply_profile(rows, "regime3", start=7) == out  # no choice depends on the index
    assert profile.rules.neutral


def test_regime3_answer_is_the_text_between_the_markers():
    profile = get_profile("regime3")
    assert profile.answer(f"think\n{ANS_START} (add 2 3) = 5 {ANS_END} more") == "(add 2 3) = 5"
    assert profile.answer(f"{ANS_START} (add 2 3) = 5") == "(add 2 3) = 5"
    assert profile.answer(" (add 2 3) = 5 ") == "(add 2 3) = 5"


def test_profiles_import_without_torch():
    script = "import sys; import libs.common.profiles; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
