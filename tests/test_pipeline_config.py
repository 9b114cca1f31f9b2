"""Pipelines as configured and planned: the target grammar, [pipeline:NAME] sections, plans and reads=.

Pure functions and config files only (no daemon), except one start-up check run as `expertd --check`.
"""

from __future__ import annotations

import os
import sys

import pytest

from expertd.config import MAX_PLANS, load_config
from expertd.errors import BadRequest, ConfigError, ExpertLoadError, UnknownExpert
from expertd.expert import expert, hooks_of
from expertd.pipelines import ON_ERROR, PipelineSpec, Plan, check_reads, load_pipelines, parse_target, plan_of

from conftest import run_expertd

# Experts with their timeouts (seconds), for the pure tests.
TIMEOUTS = {"language": 1.0, "sentiment": 2.0, "toxicity": 5.0, "textstats": 0.5, "keywords": 3.0}
SECTIONS = {
    "moderation": {"stages": "language, sentiment + toxicity", "on_error": "stop"},
    "full": {"stages": "moderation, textstats"},
    "quick": {"stages": "language", "timeout": 0.25},
    "quick_then_sentiment": {"stages": "quick, sentiment"},
    "capped": {"stages": "moderation", "timeout": 4.0},
    "pair": {"stages": "keywords + textstats"},
}
PIPELINES = load_pipelines(SECTIONS, "test.conf", TIMEOUTS)


def plan(target: str) -> Plan:
    return plan_of(target, TIMEOUTS, PIPELINES, TIMEOUTS.__getitem__)


# --- the target grammar ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, stages", [
    ("sentiment", (("sentiment",),)),
    ("language, sentiment + toxicity", (("language",), ("sentiment", "toxicity"))),
    ("language,sentiment+toxicity", (("language",), ("sentiment", "toxicity"))),
    ("  a \t+\tb ,\n c  ", (("a", "b"), ("c",))),
    ("_private.v2-beta", (("_private.v2-beta",),)),
    ("a" * 128, (("a" * 128,),)),
    ("moderation, textstats", (("moderation",), ("textstats",))),  # syntax only: names need not exist
    ("a, a", (("a",), ("a",))),  # ... nor be distinct
])
def test_a_well_formed_target_is_read_as_stages_of_names(text, stages):
    assert parse_target(text) == stages


@pytest.mark.parametrize("text, reason", [
    ("", "empty; name an expert, a pipeline, or stages such as 'a, b + c'"),
    ("   ", "empty; name an expert, a pipeline, or stages such as 'a, b + c'"),
    ("a,,b", "stage 2 is empty; separate stages with one ','"),
    ("a, ", "stage 2 is empty; separate stages with one ','"),
    (",a", "stage 1 is empty; separate stages with one ','"),
    ("a++b", "stage 1 has an empty name; join the experts of a stage with one '+' between names"),
    ("a, b+", "stage 2 has an empty name; join the experts of a stage with one '+' between names"),
    ("a b", "'a b' is not a name; use letters, digits, '_', '.', '-', starting with a letter or '_' "
            "(',' separates stages, '+' joins the experts of one stage)"),
    ("a;b", "'a;b' is not a name; use letters"),
    ("1st", "'1st' is not a name; use letters"),
    ("a\nb", "'a\\nb' is not a name; use letters"),
    ("a" * 129, "is not a name; use letters"),
    ("a, " + "é" * 200, "...' is not a name"),  # a client's long name is cut in the message
])
def test_a_malformed_target_is_refused_with_one_line_saying_what_is_wrong(text, reason):
    with pytest.raises(ValueError) as caught:
        parse_target(text)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 250
    assert message.startswith(reason) or reason in message


# --- plans ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, name, stages, on_error, timeout", [
    # One expert: a one-stage plan within its own timeout.
    ("sentiment", None, (("sentiment",),), "continue", 2.0),
    # A pipeline: its stages, its on_error, and each stage's longest expert timeout summed (1 + max(2, 5)).
    ("moderation", "moderation", (("language",), ("sentiment", "toxicity")), "stop", 6.0),
    # Nested pipelines are expanded in place; the outer one's on_error applies.
    ("full", "full", (("language",), ("sentiment", "toxicity"), ("textstats",)), "continue", 6.5),
    # A pipeline's own timeout wins, where it is named directly and where it is nested.
    ("quick", "quick", (("language",),), "continue", 0.25),
    ("quick_then_sentiment", "quick_then_sentiment", (("language",), ("sentiment",)), "continue", 2.25),
    ("capped", "capped", (("language",), ("sentiment", "toxicity")), "continue", 4.0),
    # Ad-hoc stages continue past failures; a pipeline named in them brings its stages and its timeout.
    ("language, sentiment + toxicity", None, (("language",), ("sentiment", "toxicity")), "continue", 6.0),
    ("moderation, textstats", None, (("language",), ("sentiment", "toxicity"), ("textstats",)), "continue", 6.5),
    ("quick, keywords + textstats", None, (("language",), ("keywords", "textstats")), "continue", 3.25),
    ("pair", "pair", (("keywords", "textstats"),), "continue", 3.0),
    (" moderation ", "moderation", (("language",), ("sentiment", "toxicity")), "stop", 6.0),
])
def test_a_target_plans_into_stages_of_experts_with_a_timeout(target, name, stages, on_error, timeout):
    planned = plan(target)
    assert planned == Plan(target, name, stages, on_error, timeout, planned.limits)
    assert len(planned.limits) == len(stages) and all(limit > 0 for limit in planned.limits)


@pytest.mark.parametrize("target, error, message", [
    ("sentimnet", UnknownExpert,
     "no expert or pipeline named 'sentimnet'; did you mean 'sentiment'? known: capped, full, keywords, language, "
     "moderation, pair, quick, quick_then_sentiment, sentiment, textstats and 1 more"),
    ("language, zzz", UnknownExpert, "no expert or pipeline named 'zzz'; known: capped, full, keywords,"),
    ("sentiment + moderation", BadRequest,
     "target 'sentiment + moderation': stage 1: a pipeline cannot share a stage; give moderation its own stage"),
    ("sentiment, sentiment", BadRequest,
     "target 'sentiment, sentiment': sentiment is named twice in stage 1 and stage 2; name each expert once "
     "(its opinion would be overwritten)"),
    ("toxicity + toxicity", BadRequest, "toxicity is named twice in stage 1; name each expert once"),
    ("moderation, toxicity", BadRequest,
     "toxicity is named twice in stage 1 (through pipeline moderation) and stage 2; name each expert once"),
    ("full, quick", BadRequest,
     "language is named twice in stage 1 (through pipeline full) and stage 2 (through pipeline quick)"),
    ("language,,sentiment", BadRequest, "target 'language,,sentiment': stage 2 is empty; separate stages"),
    ("", BadRequest, "target '': empty; name an expert, a pipeline, or stages such as 'a, b + c'"),
])
def test_a_target_that_cannot_be_planned_is_refused_with_one_line(target, error, message):
    with pytest.raises(error) as caught:
        plan(target)
    assert type(caught.value) is error
    assert message in caught.value.message and "\n" not in caught.value.message


def test_an_unknown_name_is_reported_as_an_unknown_expert_naming_it():
    with pytest.raises(UnknownExpert) as caught:
        plan("language, nosuch")
    assert caught.value.expert == "nosuch"
    assert caught.value.to_wire()["code"] == "unknown_expert"


def test_a_pipeline_spec_built_by_hand_plans_over_its_stages():
    hand_made = {"p": PipelineSpec("p", (("language",), ("toxicity",)), "stop", None, text="")}
    assert plan_of("p", TIMEOUTS, hand_made, TIMEOUTS.__getitem__) == Plan(
        "p", "p", (("language",), ("toxicity",)), "stop", 6.0, (TIMEOUTS["language"], TIMEOUTS["toxicity"]))


def test_plan_of_asks_the_timeout_of_experts_only():
    asked: list[str] = []

    def timeout(name: str) -> float:
        asked.append(name)
        return TIMEOUTS[name]

    plan_of("full, keywords", TIMEOUTS, PIPELINES, timeout)
    assert set(asked) <= set(TIMEOUTS) and "keywords" in asked


def test_on_error_modes_are_continue_and_stop():
    assert ON_ERROR == ("continue", "stop")


# --- reads ------------------------------------------------------------------------------------------------------


READING = load_pipelines({
    "moderation": {"stages": "language, sentiment + toxicity"},
    "outer": {"stages": "moderation, textstats"},
    "side_by_side": {"stages": "language + sentiment"},
    "backwards": {"stages": "sentiment, language"},
}, "test.conf", TIMEOUTS)


@pytest.mark.parametrize("reads, problem", [
    ({}, None),
    ({"sentiment": ["language"]}, "[pipeline:side_by_side] stages: sentiment (stage 1) reads opinions.language, which "
     "language writes in the same stage (each expert of a stage sees the document as it was before the stage); "
     "put language in an earlier stage"),
    ({"toxicity": ["language"], "textstats": ("sentiment", "toxicity")}, None),
    ({"toxicity": ["sentiment"]}, "[pipeline:moderation] stages: toxicity (stage 2) reads opinions.sentiment, which "
     "sentiment writes in the same stage (each expert of a stage sees the document as it was before the stage); "
     "put sentiment in an earlier stage"),
    ({"textstats": ["keywords"]}, "[pipeline:outer] stages: textstats (stage 3) reads opinions.keywords, which no "
     "earlier stage writes; put keywords in an earlier stage"),
    ({"language": ["toxicity"]}, "[pipeline:moderation] stages: language (stage 1) reads opinions.toxicity, which "
     "only a later stage (2) writes; put toxicity in an earlier stage"),
    ({"nobody": ["language"]}, None),  # an expert in no pipeline is never checked
])
def test_an_expert_that_reads_an_opinion_no_earlier_stage_writes_is_found(reads, problem):
    assert check_reads(READING, reads) == problem


def test_ad_hoc_targets_are_not_checked_for_reads():
    assert check_reads({}, {"sentiment": ["language"]}) is None


# --- [pipeline:NAME] sections -------------------------------------------------------------------------------------


EXPERTS = "[expertd]\n[expert:language]\nfunction = m:language\n[expert:sentiment]\nfunction = m:sentiment\n" \
          "timeout = 5s\n[expert:toxicity]\nfunction = m:toxicity\ntimeout = 2s\n"


def _load(tmp_path, text: str):
    path = tmp_path / "expertd.conf"
    path.write_text(EXPERTS + text)
    return load_config(str(path)), path


def test_a_config_without_pipelines_has_none(tmp_path):
    config, _ = _load(tmp_path, "")
    assert config.pipelines == {}


def test_pipeline_sections_are_read_with_their_settings(tmp_path):
    config, _ = _load(tmp_path, "[pipeline:moderation]\nstages = language, sentiment + toxicity\non_error = stop\n"
                                "[pipeline:all]\nstages = moderation\ntimeout = 90s\n[pipeline:plain]\n"
                                "stages = toxicity\ntimeout =\non_error =\n")
    assert config.pipelines == {
        "moderation": PipelineSpec("moderation", (("language",), ("sentiment", "toxicity")), "stop", None,
                                   "language, sentiment + toxicity"),
        "all": PipelineSpec("all", (("language",), ("sentiment", "toxicity")), "continue", 90.0, "moderation"),
        "plain": PipelineSpec("plain", (("toxicity",),), "continue", None, "toxicity"),
    }
    assert config.plan("moderation").timeout == 60.0 + 5.0  # language takes the daemon's 60s
    assert config.plan("all").timeout == 90.0


def test_expert_timeout_covers_pipelines_and_stages_and_never_raises(tmp_path):
    config, _ = _load(tmp_path, "[pipeline:moderation]\nstages = language, sentiment + toxicity\n")
    assert config.expert_timeout("toxicity") == 2.0  # experts unchanged
    assert config.expert_timeout("language") == 60.0
    assert config.expert_timeout("moderation") == 65.0
    assert config.expert_timeout("sentiment, toxicity") == 7.0
    assert config.expert_timeout("sentiment+toxicity") == 5.0
    for hopeless in ("nosuch", "nosuch, language", "sentiment + moderation", "a,,b", "", "toxicity, toxicity"):
        assert config.expert_timeout(hopeless) == 60.0


def test_plans_are_remembered_but_never_more_than_a_bounded_number(tmp_path):
    config, _ = _load(tmp_path, "")
    assert config.plan("language, toxicity") is config.plan("language, toxicity")
    for spaces in range(MAX_PLANS + 10):  # every one a distinct target a client could send
        assert config.plan(" " * spaces + "toxicity").stages == (("toxicity",),)
    assert len(config._plans) <= MAX_PLANS


@pytest.mark.parametrize("text, message", [
    ("[pipelines:m]\nstages = language\n",
     "[pipelines:m]: unknown section; use [expertd], one [expert:NAME] per expert and one [pipeline:NAME] per "
     "pipeline"),
    ("[pipeline:bad name]\nstages = language\n",
     "[pipeline:bad name]: bad pipeline name 'bad name'; use letters, digits, '_', '.', '-', starting with a letter "
     "or '_'"),
    ("[pipeline:a,b]\nstages = language\n",
     "[pipeline:a,b]: bad pipeline name 'a,b'; use letters, digits, '_', '.', '-', starting with a letter or '_'"),
    ("[pipeline:sentiment]\nstages = language\n",
     "[pipeline:sentiment]: an expert is named sentiment too; rename the pipeline (experts and pipelines share one "
     "namespace)"),
    ("[pipeline:m]\non_error = stop\n",
     "[pipeline:m]: no stages; add 'stages = EXPERT, EXPERT + EXPERT' (',' separates stages, '+' joins the experts "
     "of one stage)"),
    ("[pipeline:m]\nstages =\n",
     "[pipeline:m] stages: empty; name an expert, a pipeline, or stages such as 'a, b + c'"),
    ("[pipeline:m]\nstages = language,, sentiment\n",
     "[pipeline:m] stages: stage 2 is empty; separate stages with one ','"),
    ("[pipeline:m]\nstages = language + \n",
     "[pipeline:m] stages: stage 1 has an empty name; join the experts of a stage with one '+' between names"),
    ("[pipeline:m]\nstages = language sentiment\n",
     "[pipeline:m] stages: 'language sentiment' is not a name; use letters, digits, '_', '.', '-', starting with "
     "a letter or '_' (',' separates stages, '+' joins the experts of one stage)"),
    ("[pipeline:m]\nstage = language\n", "[pipeline:m] stage: unknown setting; did you mean 'stages'?"),
    ("[pipeline:m]\nstages = language\nfunction = m:f\n",
     "[pipeline:m] function: unknown setting; known settings: on_error, stages, timeout"),
    ("[pipeline:m]\nstages = language\non_error = halt\n",
     "[pipeline:m] on_error = 'halt': not continue or stop; continue runs the later stages after a failure, stop "
     "skips them"),
    ("[pipeline:m]\nstages = language\ntimeout = soon\n",
     "[pipeline:m] timeout = 'soon': not a duration; use seconds or a number with ms, s, m or h (e.g. 30s)"),
    ("[pipeline:m]\nstages = langauge, sentiment\n",
     "[pipeline:m] stages: no expert or pipeline named 'langauge'; did you mean 'language'? known: language, m, "
     "sentiment, toxicity"),
    ("[pipeline:m]\nstages = language, sentiment + toxicity, sentiment\n",
     "[pipeline:m] stages: sentiment is named twice in stage 2 and stage 3; name each expert once (its opinion "
     "would be overwritten)"),
    ("[pipeline:inner]\nstages = language, sentiment\n[pipeline:m]\nstages = inner, toxicity + sentiment\n",
     "[pipeline:m] stages: sentiment is named twice in stage 1 (through pipeline inner) and stage 2; name each "
     "expert once (its opinion would be overwritten)"),
    ("[pipeline:inner]\nstages = language\n[pipeline:m]\nstages = sentiment + inner\n",
     "[pipeline:m] stages: stage 1: a pipeline cannot share a stage; give inner its own stage"),
    ("[pipeline:broken]\nstages = nosuch\n[pipeline:m]\nstages = broken\n",
     "[pipeline:broken] stages: no expert or pipeline named 'nosuch'; known: broken, language, m, sentiment, "
     "toxicity"),
])
def test_a_bad_pipeline_section_is_refused_with_one_line_naming_file_section_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert str(caught.value) == f"{tmp_path / 'expertd.conf'}: {message}"


@pytest.mark.parametrize("text, message", [
    ("[pipeline:loop]\nstages = language, loop\n",
     "[pipeline:loop] stages: names loop itself: a cycle; remove one of these references"),
    ("[pipeline:a]\nstages = language, b\n[pipeline:b]\nstages = a, sentiment\n",
     "[pipeline:a] stages: names b, which names a: a cycle; remove one of these references"),
    ("[pipeline:a]\nstages = b\n[pipeline:b]\nstages = c\n[pipeline:c]\nstages = toxicity, a\n",
     "[pipeline:a] stages: names b, which names c, which names a: a cycle; remove one of these references"),
    ("[pipeline:start]\nstages = b\n[pipeline:b]\nstages = c\n[pipeline:c]\nstages = b\n",
     "[pipeline:b] stages: names c, which names b: a cycle; remove one of these references"),
])
def test_a_pipeline_that_names_itself_through_another_is_refused_with_the_cycle(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert str(caught.value) == f"{tmp_path / 'expertd.conf'}: {message}"


def test_the_shipped_config_has_an_example_pipeline():
    from conftest import ROOT

    config = load_config(str(ROOT / "etc" / "expertd.conf"))
    assert config.pipelines["moderation"].stages == (("keywords", "textstats"), ("sentiment",))


# --- @expert(reads=...) and the load-time check ------------------------------------------------------------------


@pytest.mark.parametrize("reads, error, message", [
    ("language", TypeError,
     "expert(): reads must be a list or tuple of opinion names, such as ('language',), not a str"),
    (b"language", TypeError, "not a bytes"),
    (42, TypeError, "expert(): reads must be a list or tuple of opinion names, not int"),
    (["language", 7], TypeError, "expert(): reads holds 7, a int; list opinion names (the names of the experts "
                                 "whose opinions it reads) as strings"),
    ([None], TypeError, "reads holds None, a NoneType"),
    ([""], ValueError, "expert(): reads holds ''; name an expert, without spaces around it"),
    ([" language"], ValueError, "reads holds ' language'"),
])
def test_expert_reads_refuses_anything_but_opinion_names(reads, error, message):
    with pytest.raises(error) as caught:
        expert(reads=reads)
    assert message in str(caught.value)


def test_expert_reads_are_kept_on_the_function_once_each_in_order():
    @expert(reads=iter(["language", "keywords", "language"]))
    def opinion(doc):
        return {}

    assert hooks_of(opinion).reads == ("language", "keywords")
    assert hooks_of(lambda doc: doc).reads == ()


READER_MODULE = '''
from expertd import expert

def language(doc):
    return "en"

@expert(reads=("language",))
def sentiment(doc):
    return doc["opinions"]["language"]
'''


def _reader_config(directory, module: str, stages: str):
    (directory / f"{module}.py").write_text(READER_MODULE)
    path = directory / "expertd.conf"
    path.write_text(f"[expertd]\npythonpath = {directory}\n[expert:language]\nfunction = {module}:language\n"
                    f"[expert:sentiment]\nfunction = {module}:sentiment\n[pipeline:moderation]\nstages = {stages}\n")
    return path


def test_loaded_experts_describe_what_they_read(tmp_path, monkeypatch):
    from expertd.loader import load_experts

    monkeypatch.setattr(sys, "path", list(sys.path))  # load_experts prepends pythonpath
    # (and sets TensorFlow's log level in the environment, which daemons started later would inherit)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    config = load_config(str(_reader_config(tmp_path, "xd_reads_ok", "language, sentiment")))
    experts = load_experts(config)
    assert experts["sentiment"].reads == ("language",)
    assert experts["sentiment"].describe()["reads"] == ["language"]
    assert experts["language"].describe()["reads"] == []


def test_a_pipeline_that_runs_a_reader_before_what_it_reads_fails_the_load_naming_file_and_pipeline(tmp_path,
                                                                                                   monkeypatch):
    from expertd.loader import load_experts

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    config = load_config(str(_reader_config(tmp_path, "xd_reads_bad", "sentiment, language")))
    with pytest.raises(ExpertLoadError) as caught:
        load_experts(config)
    assert str(caught.value) == (
        f"{config.path}: [pipeline:moderation] stages: sentiment (stage 1) reads opinions.language, which only a "
        "later stage (2) writes; put language in an earlier stage")


def test_expertd_check_stops_on_a_pipeline_whose_reads_are_not_met(short_dir):
    path = _reader_config(short_dir, "xd_reads_check", "sentiment + language")
    done = run_expertd("--config", str(path), "--check")
    assert done.returncode == 3, done.stderr
    assert done.stderr == (
        f"expertd: {path}: [pipeline:moderation] stages: sentiment (stage 1) reads opinions.language, which "
        "language writes in the same stage (each expert of a stage sees the document as it was before the stage); "
        "put language in an earlier stage\n")
