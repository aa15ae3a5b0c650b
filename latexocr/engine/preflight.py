"""Before any weights load or GPU time is spent: every image opens and every sample fits, and how long each is."""

from dataclasses import dataclass

from PIL import Image
from tqdm.auto import tqdm

from latexocr import chat
from latexocr.data import image_problem

LENGTH_EDGES = (0, 64, 128, 256, 512, 1024)  # the histogram printed of the samples' lengths, in tokens


@dataclass
class Lengths:
    tokens: list[int]  # per sample: prompt, image tokens, answer and its end token
    image_tokens: list[int]
    answer_rows: list[int]  # labelled positions: the answer's tokens and its end token

    def first(self, n: int) -> "Lengths":
        """The first n samples' lengths (the training samples, checked together with the val ones after them)."""
        return Lengths(self.tokens[:n], self.image_tokens[:n], self.answer_rows[:n])

    def over_cap(self, max_new_tokens: int, first: int = 0) -> str:
        """A note when answers (from sample `first` on) need more tokens than generation may make: their
        predictions would be cut short and scored as wrong; "" when none does."""
        longer = [rows for rows in self.answer_rows[first:] if rows > max_new_tokens]
        if not longer:
            return ""
        return (f"note: {len(longer)} answer(s) need more than eval_max_new_tokens={max_new_tokens} tokens (the longest "
                f"{max(longer)}, its end token included): their predictions will be cut short and scored as wrong. "
                f"Raise --eval_max_new_tokens to {max(longer)} or more.")

    def histogram(self, max_length: int) -> str:
        edges = [*LENGTH_EDGES, max_length + 1]
        counts = [sum(lo <= n < hi for n in self.tokens) for lo, hi in zip(edges, edges[1:])]
        return ("sample length (tokens): " + ", ".join(f"{lo}-{hi - 1}: {c}" for lo, hi, c in
                                                      zip(edges, edges[1:], counts) if c)
                + f"; longest {max(self.tokens)}")


def prompt_tokens(processor, prompt: str, token_px: int) -> int:
    """Tokens of the chat-formatted prompt around the image, less the image's own."""
    one_token = chat.sizing(image_size=f"{token_px}x{token_px}", token_px=token_px)
    blank = chat.load_image(Image.new("RGB", (token_px, token_px), "white"), one_token)
    return len(chat.encode_prompts(processor, [blank], prompt)["input_ids"][0]) - 1


def check_samples(samples: list, processor, prompt: str, image_sizing: dict, max_length: int, sources: str,
                  show_progress: bool = True) -> Lengths:
    """Lengths of every sample; a SystemExit listing the samples that cannot be used (at most 10), if any."""
    around = prompt_tokens(processor, prompt, image_sizing["token_px"])
    answers = processor.tokenizer([s.text for s in samples], add_special_tokens=False)["input_ids"]
    lengths, problems = Lengths([], [], []), []
    for sample, answer in zip(tqdm(samples, desc="pre-flight", unit="sample", disable=not show_progress), answers):
        problem = image_problem(sample.image)
        if problem:
            problems.append(f"record {sample.id}: {problem}: {sample.image}")
            continue
        with Image.open(sample.image) as image:
            lengths.image_tokens.append(chat.image_tokens(*image.size, image_sizing))
        lengths.answer_rows.append(len(answer) + 1)
        lengths.tokens.append(around + lengths.image_tokens[-1] + len(answer) + 1)
        if lengths.tokens[-1] > max_length:
            problems.append(f"record {sample.id}: {lengths.tokens[-1]} tokens, more than max_length={max_length} "
                            f"(answer of {len(answer)} tokens, image {sample.image})")
    if problems:
        raise SystemExit(f"{len(problems)} sample(s) in {sources} cannot be used:\n  " + "\n  ".join(problems[:10])
                         + "\nFix or remove them (csv2json.py skips such rows), or raise --max_length / lower "
                         "--max_pixels.")
    return lengths
