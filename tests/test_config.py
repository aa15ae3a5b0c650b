import pytest

from latexocr.config import apply_overrides


def constants():
    return {"BATCH_SIZE": 4, "LEARNING_RATE": 1e-4, "GRADIENT_CHECKPOINTING": True, "MODEL_ID": "Qwen/x",
            "__doc__": "A script.", "helper": len, "np": object()}


def test_overrides_are_typed_like_their_defaults():
    ns = constants()
    config = apply_overrides(ns, ["--batch_size=8", "--learning_rate=3e-3", "--gradient_checkpointing=false",
                                  "--model_id=tiny-random"])
    assert ns["BATCH_SIZE"] == 8 and isinstance(ns["BATCH_SIZE"], int)
    assert ns["LEARNING_RATE"] == 3e-3
    assert ns["GRADIENT_CHECKPOINTING"] is False
    assert ns["MODEL_ID"] == "tiny-random"
    assert config == {"batch_size": 8, "learning_rate": 3e-3, "gradient_checkpointing": False,
                      "model_id": "tiny-random"}


def test_float_accepts_an_integer_literal_and_upper_case_names_work():
    ns = constants()
    apply_overrides(ns, ["--LEARNING_RATE=1"])
    assert ns["LEARNING_RATE"] == 1.0 and isinstance(ns["LEARNING_RATE"], float)


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=four", "--batch_size=four: expected an integer"),
    ("--batch_size=2.5", "expected an integer"),
    ("--learning_rate=fast", "expected a number"),
    ("--gradient_checkpointing=maybe", "expected true or false"),
])
def test_wrong_types_are_refused_with_the_value(arg, message):
    with pytest.raises(SystemExit, match=message):
        apply_overrides(constants(), [arg])


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(SystemExit) as error:
        apply_overrides(constants(), ["--lora_rnak=8"])
    text = str(error.value)
    assert "unknown setting --lora_rnak" in text
    assert "batch_size, learning_rate, gradient_checkpointing, model_id" in text
    assert "helper" not in text and "np" not in text.split("Valid settings:")[1]


def test_arguments_without_name_value_form_are_refused():
    with pytest.raises(SystemExit, match="use --name=value"):
        apply_overrides(constants(), ["--batch_size", "8"])


def test_help_shows_every_constant_and_its_default():
    with pytest.raises(SystemExit) as error:
        apply_overrides(constants(), ["--help"])
    assert "A script." in str(error.value) and "--batch_size" in str(error.value) and "4" in str(error.value)
