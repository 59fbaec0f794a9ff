"""SpavaError: one line that starts with the setting it names."""
from spava_plan.errors import ConfigError, InputError, SpavaError


def test_the_setting_prefix_is_kept_when_the_name_occurs_in_the_text():
    exc = InputError('is required: question="..."', setting="question")
    assert str(exc) == 'question: is required: question="..."'
    exc = ConfigError("must be at least frames=8, got frames=2", setting="frames")
    assert str(exc).startswith("frames: must be")


def test_the_prefix_is_added_once_and_the_message_is_one_line():
    assert str(ConfigError("gpus: must be >= 1", setting="gpus")) == "gpus: must be >= 1"
    assert str(SpavaError("two\nlines   here", setting="video.fps")) == "video.fps: two lines here"
    assert str(SpavaError("no setting")) == "no setting"
