"""Build the embedded instruction set: prompts from templates, responses from the embedded teacher.

Writes assets/instructions/train.jsonl and heldout.jsonl (every 10th prompt) in the chat
`messages` schema, with a `category` field. Deterministic from --seed; run once, commit
the output:

    uv run python assets/make_instructions.py

`--extra N` writes a larger training set instead (default assets/instructions/train_large.jsonl):
the training split above plus N new prompts from the same templates over longer word lists,
none of them in the embedded set, with the teacher's responses. The held-out split is unchanged.
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


# Longer word lists for --extra (the embedded set uses only the lists above).
MORE_TOPICS = ["a summer festival", "a quiet beach", "an abandoned house", "a snowy forest", "the last day of school",
               "a hot air balloon", "a jazz club", "a fishing village", "a broken umbrella", "the night sky",
               "a child's first bicycle", "a farmers' market", "a waterfall", "a clock tower", "a long flight",
               "grandmother's kitchen", "a paper boat", "a marathon", "an empty stadium", "a field of sunflowers",
               "a midnight snack", "a foggy harbor", "a new job", "a bakery at dawn", "a museum at closing time",
               "an old photograph", "a power outage", "a treehouse", "a river in winter", "a street musician"]
MORE_PRODUCTS = ["a smart thermostat", "a yoga mat", "a travel mug", "a wireless mouse", "an electric kettle",
                 "a pair of running shoes", "a standing desk", "a camping tent", "a fitness tracker", "a french press",
                 "a rice cooker", "a bluetooth speaker", "a wool sweater", "an office chair", "a digital camera",
                 "a garden hose", "a baby stroller", "an air purifier", "a paperback novel", "a chess set"]
MORE_CONCEPTS = ["an atom", "the immune system", "a recession", "renewable energy", "the stock market",
                 "climate change", "a rainbow", "the moon's phases", "an earthquake", "a calorie",
                 "osmosis", "a tax", "recycling", "a food chain", "magnetism", "the seasons", "a budget",
                 "an algorithm", "a hurricane", "friction", "a cell", "photosynthesis in the ocean", "tides",
                 "the printing press", "a vaccine trial", "interest rates", "an eclipse", "sound waves",
                 "a chemical reaction", "biodiversity", "encryption", "a fraction", "probability",
                 "the heart", "sleep", "erosion", "a constitution", "the scientific method", "a galaxy",
                 "antibiotics"]
MORE_CODE_TASKS = ["sorts a list of words by length", "checks whether two strings are anagrams",
                   "returns the second largest number in a list", "counts how often each word occurs",
                   "converts a number to binary", "returns the greatest common divisor of two numbers",
                   "capitalizes the first letter of every word", "checks whether a year is a leap year",
                   "returns the sum of the digits of a number", "removes all spaces from a string",
                   "finds the longest word in a sentence", "returns the even numbers of a list",
                   "rotates a list by k positions", "checks whether a list is sorted",
                   "returns the product of a list of numbers", "converts minutes to hours and minutes",
                   "counts the uppercase letters in a string", "returns the median of a list",
                   "transposes a matrix given as a list of lists", "checks whether a number is a perfect square",
                   "returns the intersection of two lists", "replaces every vowel in a string with '*'",
                   "splits a list into chunks of size n", "returns the n smallest numbers of a list",
                   "reverses the order of words in a sentence",
                   "checks whether a string contains only digits", "returns the last n items of a list",
                   "converts a list of strings to uppercase", "finds the smallest number in a list",
                   "returns a dictionary counting each character of a string"]


def _order_prompt(rng: random.Random) -> str:
    a, b, c = rng.sample(NAMES, 3)
    return rng.choice([
        f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest?",
        f"{a} finished the race before {b}, and {c} finished after {b}. Who finished first?",
        f"{a} has more books than {b}. {b} has more books than {c}. Does {c} have more books than {a}?",
        f"If it is raining, {a} takes an umbrella. {a} did not take an umbrella. Was it raining?"])


def _counting_prompt(rng: random.Random) -> str:
    n = rng.randint(3, 12)
    return rng.choice([
        f"A week from today is {rng.choice(['Monday', 'Thursday', 'Saturday'])}. What day is it today?",
        f"I have {n} apples and give away {rng.randint(1, n - 1)}. Then I buy {rng.randint(1, 9)} more. "
        "How many apples do I have? Explain step by step.",
        f"There are {n} people in a room and each shakes hands with every other person once. "
        "How many handshakes are there?"])


def _math_prompt(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return rng.choice([
        f"What is {a} + {b}?", f"What is {a} times {b}?", f"What is {a * b} divided by {b}?",
        f"A notebook costs {a} cents. How much do {b % 9 + 2} notebooks cost?",
        f"What is {a}% of {b * 10}?", f"Is {a * 2 + 1} a prime number?",
        f"Solve for x: x + {a} = {a + b}."])


def _code_trace_prompt(rng: random.Random) -> str:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What does this Python code print?\n\nx = {a}\ny = {b}\nprint(x * y + x)"


def _unique(prompts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, unique = set(), []
    for category, prompt in prompts:
        if prompt not in seen:
            seen.add(prompt)
            unique.append((category, prompt))
    return unique


def make_prompts(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    prompts = []
    prompts += [("writing", w.format(t=t)) for w in WRITING for t in TOPICS[:14]]
    prompts += [("writing", w.format(p=p)) for w in WRITING_PRODUCTS for p in PRODUCTS]
    prompts += [("qa", q.format(c=c)) for q in QA for c in CONCEPTS]
    prompts += [("qa", f) for f in FACTS]
    prompts += [("reasoning", _order_prompt(rng)) for _ in range(40)]
    prompts += [("reasoning", _counting_prompt(rng)) for _ in range(25)]
    prompts += [("math", _math_prompt(rng)) for _ in range(80)]
    prompts += [("code", c.format(task=task)) for c in CODE for task in CODE_TASKS]
    prompts += [("code", _code_trace_prompt(rng)) for _ in range(20)]
    return _unique(prompts)


def make_extra_prompts(seed: int, count: int, exclude: set[str]) -> list[tuple[str, str]]:
    """`count` more prompts from the same templates over longer word lists, none of them in
    `exclude` (the embedded set, so its held-out prompts stay unseen), drawn in the embedded
    set's mix of templates."""
    rng = random.Random(seed)
    topics, products = TOPICS + MORE_TOPICS, PRODUCTS + MORE_PRODUCTS
    concepts, tasks = CONCEPTS + MORE_CONCEPTS, CODE_TASKS + MORE_CODE_TASKS
    makers = [  # (category, weight = the template's count in the embedded set, maker)
        ("writing", 70, lambda: rng.choice(WRITING).format(t=rng.choice(topics))),
        ("writing", 16, lambda: rng.choice(WRITING_PRODUCTS).format(p=rng.choice(products))),
        ("qa", 80, lambda: rng.choice(QA).format(c=rng.choice(concepts))),
        ("reasoning", 40, lambda: _order_prompt(rng)),
        ("reasoning", 25, lambda: _counting_prompt(rng)),
        ("math", 80, lambda: _math_prompt(rng)),
        ("code", 45, lambda: rng.choice(CODE).format(task=rng.choice(tasks))),
        ("code", 20, lambda: _code_trace_prompt(rng))]
    total = sum(weight for _, weight, _ in makers)
    quotas = [count * weight // total for _, weight, _ in makers]
    for i in range(count - sum(quotas)):  # the remainder to the largest templates
        quotas[i] += 1
    seen, prompts = set(exclude), []
    for (category, _, maker), quota in zip(makers, quotas):
        made = 0
        for _ in range(200 * quota):
            if made == quota:
                break
            prompt = maker()
            if prompt not in seen:
                seen.add(prompt)
                prompts.append((category, prompt))
                made += 1
        if made < quota:
            raise ValueError(f"the {category} templates give only {made} new prompts of the {quota} "
                             f"that --extra {count} needs; ask for fewer")
    rng.shuffle(prompts)
    return prompts


def generate_records(prompts, model, tokenizer, max_new_tokens: int, batch_size: int) -> list[dict]:
    """The teacher's sampled response to each prompt, as chat `messages` records."""
    records = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for _, p in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7,
                                 top_p=0.9, repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id)
        for (category, prompt), row in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
            response = tokenizer.decode(row, skip_special_tokens=True).strip()
            records.append({"category": category, "messages": [{"role": "user", "content": prompt},
                                                               {"role": "assistant", "content": response}]})
        print(f"{len(records)}/{len(prompts)}", flush=True)
    return records


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} records -> {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--extra", type=int, default=0,
                        help="instead of the embedded set, write a larger training set: its training "
                             "split plus this many new prompts with the teacher's responses")
    parser.add_argument("--output", type=Path, default=OUT_DIR / "train_large.jsonl",
                        help="where --extra writes (default %(default)s)")
    args = parser.parse_args()
    if args.extra:
        if args.extra < 0:
            sys.exit(f"--extra {args.extra}: give a positive number of new prompts")
        if args.output.exists() or not args.output.parent.is_dir():
            sys.exit(f"--output {args.output}: the file exists or its directory does not; choose another path")
        # Excluded: the committed set itself, held-out prompts included, whatever --seed says.
        train, heldout = ([json.loads(line) for line in open(OUT_DIR / f"{split}.jsonl")]
                          for split in ("train", "heldout"))
        try:
            prompts = make_extra_prompts(args.seed + 1, args.extra,
                                         {r["messages"][0]["content"] for r in train + heldout})
        except ValueError as e:
            sys.exit(str(e))
    else:
        prompts = make_prompts(args.seed)
    model, tokenizer = load_model()
    tokenizer.padding_side = "left"
    torch.manual_seed(args.seed)
    records = generate_records(prompts, model, tokenizer, args.max_new_tokens, args.batch_size)
    if args.extra:
        write_jsonl(args.output, train + records)
        return
    OUT_DIR.mkdir(exist_ok=True)
    write_jsonl(OUT_DIR / "train.jsonl", [r for i, r in enumerate(records) if i % 10 != 9])
    write_jsonl(OUT_DIR / "heldout.jsonl", [r for i, r in enumerate(records) if i % 10 == 9])


if __name__ == "__main__":
    main()
