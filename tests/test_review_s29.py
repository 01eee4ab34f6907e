"""Session 29: defects from earlier sessions' "seen, not fixed" lists, each shown by a test that failed first."""

import dataclasses

import pytest

from elastic_moe.tasks import get_suite, open_ended


def test_open_ended_demonstration_of_a_task_saved_without_kind():
    # tasks written before session 28 carry a topic but no "kind"; their demonstration used to raise KeyError
    for task in get_suite("open_ended", "train", n=20, seed=3, difficulty=2):
        expected = open_ended.demonstration(task)
        for drop in (("kind",), ("topic", "kind")):
            old = dataclasses.replace(task, metadata={k: v for k, v in task.metadata.items() if k not in drop})
            assert open_ended.topic_and_kind(old) == (task.metadata["topic"], task.metadata["kind"])
            assert open_ended.demonstration(old) == expected
            assert old.verify(expected[-1]["content"]).correct


def test_open_ended_task_without_topic_anywhere_is_a_clear_error():
    task = get_suite("open_ended", "train", n=1, seed=0)[0]
    bare = dataclasses.replace(task, metadata={}, messages=[{"role": "user", "content": "Say something."}])
    with pytest.raises(ValueError, match="no topic and kind"):
        open_ended.demonstration(bare)
