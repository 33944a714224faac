"""Build the embedded instruction set: prompts from templates, responses from the embedded teacher.

Writes assets/instructions/train.jsonl and heldout.jsonl (every 10th prompt) in the chat
`messages` schema, with a `category` field. Deterministic from --seed; run once, commit
the output:

    uv run python assets/make_instructions.py
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import load_model  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "instructions"

TOPICS = ["the ocean", "autumn leaves", "a busy city", "a lost key", "the first snow", "a lighthouse",
          "friendship", "a rainy Monday", "the moon", "an old library", "a mountain hike", "coffee",
          "a robot learning to paint", "a garden in spring", "a train journey", "homework", "a thunderstorm",
          "a forgotten birthday", "the desert at night", "a cat on a windowsill"]
WRITING = ["Write a haiku about {t}.", "Write a four-line poem about {t}.",
           "Write the opening sentence of a short story about {t}.", "Describe {t} in three sentences.",
           "Write a short, friendly tweet about {t}."]
PRODUCTS = ["a reusable water bottle", "noise-cancelling headphones", "a folding bicycle", "a desk lamp",
            "a hiking backpack", "a solar phone charger", "a cast-iron pan", "a mechanical keyboard"]
WRITING_PRODUCTS = ["Write a two-sentence product description for {p}.",
                    "Write a polite email asking a store about the warranty of {p}."]
CONCEPTS = ["photosynthesis", "gravity", "inflation", "a black hole", "the water cycle", "democracy",
            "machine learning", "vaccination", "plate tectonics", "the greenhouse effect", "a prime number",
            "an ecosystem", "supply and demand", "electricity", "evolution", "the internet", "DNA",
            "a volcano", "compound interest", "the speed of light"]
QA = ["What is {c}?", "Explain {c} to a ten-year-old.", "Give one everyday example of {c}.",
      "Why is {c} important?"]
FACTS = ["What is the capital of France?", "How many days are in a leap year?", "What planet is closest to the sun?",
         "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
         "How many continents are there?", "What gas do plants absorb from the air?",
         "What is the largest ocean on Earth?", "How many legs does a spider have?",
         "What language is spoken in Brazil?", "What is the chemical symbol for gold?",
         "How many minutes are in an hour?", "What is the freezing point of water in Fahrenheit?",
         "Which animal is known as the king of the jungle?", "What is the tallest mountain in the world?"]
NAMES = ["Alice", "Bob", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon"]
CODE_TASKS = ["returns the sum of a list of numbers", "reverses a string", "checks whether a number is prime",
              "counts the vowels in a string", "returns the largest element of a list",
              "computes the factorial of n", "removes duplicates from a list while keeping order",
              "checks whether a string is a palindrome", "returns the n-th Fibonacci number",
              "converts Celsius to Fahrenheit", "merges two sorted lists", "counts words in a sentence",
              "returns the average of a list", "flattens a list of lists", "finds the index of an item in a list"]
CODE = ["Write a Python function that {task}.", "Write a JavaScript function that {task}.",
        "Explain how you would write a function that {task}."]


def make_prompts(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    prompts = []
    prompts += [("writing", w.format(t=t)) for w in WRITING for t in TOPICS[:14]]
    prompts += [("writing", w.format(p=p)) for w in WRITING_PRODUCTS for p in PRODUCTS]
    prompts += [("qa", q.format(c=c)) for q in QA for c in CONCEPTS]
    prompts += [("qa", f) for f in FACTS]
    for _ in range(40):
        a, b, c = rng.sample(NAMES, 3)
        prompts.append(("reasoning", rng.choice([
            f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest?",
            f"{a} finished the race before {b}, and {c} finished after {b}. Who finished first?",
            f"{a} has more books than {b}. {b} has more books than {c}. Does {c} have more books than {a}?",
            f"If it is raining, {a} takes an umbrella. {a} did not take an umbrella. Was it raining?"])))
    for _ in range(25):
        n = rng.randint(3, 12)
        prompts.append(("reasoning", rng.choice([
            f"A week from today is {rng.choice(['Monday', 'Thursday', 'Saturday'])}. What day is it today?",
            f"I have {n} apples and give away {rng.randint(1, n - 1)}. Then I buy {rng.randint(1, 9)} more. "
            "How many apples do I have? Explain step by step.",
            f"There are {n} people in a room and each shakes hands with every other person once. "
            "How many handshakes are there?"])))
    for _ in range(80):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        prompts.append(("math", rng.choice([
            f"What is {a} + {b}?", f"What is {a} times {b}?", f"What is {a * b} divided by {b}?",
            f"A notebook costs {a} cents. How much do {b % 9 + 2} notebooks cost?",
            f"What is {a}% of {b * 10}?", f"Is {a * 2 + 1} a prime number?",
            f"Solve for x: x + {a} = {a + b}."])))
    prompts += [("code", c.format(task=task)) for c in CODE for task in CODE_TASKS]
    for _ in range(20):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompts.append(("code", f"What does this Python code print?\n\nx = {a}\ny = {b}\nprint(x * y + x)"))
    seen, unique = set(), []
    for category, prompt in prompts:
        if prompt not in seen:
            seen.add(prompt)
            unique.append((category, prompt))
    return unique


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    prompts = make_prompts(args.seed)
    model, tokenizer = load_model()
    tokenizer.padding_side = "left"
    torch.manual_seed(args.seed)
    records = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for _, p in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                                 top_p=0.9, repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id)
        for (category, prompt), row in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
            response = tokenizer.decode(row, skip_special_tokens=True).strip()
            records.append({"category": category, "messages": [{"role": "user", "content": prompt},
                                                               {"role": "assistant", "content": response}]})
        print(f"{len(records)}/{len(prompts)}", flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    splits = {"train": [r for i, r in enumerate(records) if i % 10 != 9],
              "heldout": [r for i, r in enumerate(records) if i % 10 == 9]}
    for name, rows in splits.items():
        with open(OUT_DIR / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} records -> {OUT_DIR / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
