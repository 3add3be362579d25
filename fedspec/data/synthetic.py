"""The default task that ships with fedspec: generated 4-class news-topic sentences.

Why generated: the repository must not hold third-party text, yet every command needs a task that runs
offline with no download. Templates and word lists below were written for this project. A seeded
``random.Random`` fills them, so the same seed gives the same sentences in every process.

What makes it a fair task rather than a keyword lookup:
- several templates per class, each with slots (countries, cities, teams, companies, technologies,
  people, numbers), so thousands of distinct sentences come out;
- label-independent noise shared by all classes: people's names, cities, weekdays, openers such as
  "In a surprise move," and tails such as ", local media reported";
- a few borderline templates per class borrow another class's vocabulary (a club's sponsorship deal is
  business news, a country's first satellite is science news), as real news topics do.
The topic still dominates each sentence, so a pretrained sentence encoder learns it easily.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from fedspec.data.examples import DataError, TextExamples

TOPIC_LABEL_NAMES: tuple[str, ...] = ("world", "sports", "business", "science/tech")
MAX_WORDS = 25

# --------------------------------------------------------------------------------------------------
# Word lists. Tuples (never sets) so iteration order, and therefore the output, is fixed.
# --------------------------------------------------------------------------------------------------

_PEOPLE_FIRST = (
    "Maria", "James", "Aisha", "Tomas", "Yuki", "Daniel", "Fatima", "Lucas", "Elena", "Samuel",
    "Priya", "Mateo", "Grace", "Omar", "Ingrid", "Kwame", "Sofia", "Victor", "Hana", "Leo",
)
_PEOPLE_LAST = (
    "Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Mensah", "Kowalski", "Haddad",
    "Fischer", "Rossi", "Nakamura", "Silva", "Petrov", "Byrne", "Castillo", "Osei", "Varga", "Dubois",
    "Holm",
)
_COUNTRIES = (
    "Brazil", "Canada", "Egypt", "France", "Germany", "India", "Indonesia", "Japan", "Kenya", "Mexico",
    "Nigeria", "Norway", "Pakistan", "Peru", "Poland", "Portugal", "South Korea", "Spain", "Sweden",
    "Thailand", "Turkey", "Ukraine", "Vietnam", "Chile", "Ghana", "Argentina", "Australia", "Ireland",
)
_CITIES = (
    "Lagos", "Oslo", "Lima", "Hanoi", "Nairobi", "Lisbon", "Toronto", "Manila", "Warsaw", "Cairo",
    "Santiago", "Mumbai", "Melbourne", "Dublin", "Seoul", "Istanbul", "Accra", "Madrid",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WIRES = ("Global Wire", "NewsDesk", "Daily Ledger", "World Report")
_SMALL_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")

# world
_LEADERS = (
    "the prime minister", "the foreign minister", "the president", "the opposition leader",
    "the defence minister", "the interior minister", "the trade minister",
)
_REGIONS = (
    "the border region", "the northern provinces", "the capital", "the coastal south",
    "the eastern highlands", "the western districts",
)
_WORLD_ISSUES = (
    "the border dispute", "refugee resettlement", "nuclear inspections", "the hostage crisis",
    "regional security", "the disputed election results", "humanitarian aid", "fishing rights",
    "water sharing along the river", "the release of detained journalists",
)
_GROUPS = (
    "protesters", "opposition supporters", "rebel fighters", "refugees", "election observers",
    "aid workers", "students", "farmers",
)
_DEMANDS = (
    "the resignation of the government", "fresh elections", "an end to the curfew",
    "the release of political prisoners", "a new constitution", "an inquiry into police violence",
)
_WORLD_ACTIONS = (
    "a ceasefire along their shared border", "exchange prisoners", "reopen their embassies",
    "resume peace negotiations", "withdraw troops from the disputed area", "a joint border patrol",
)
_AID = ("food convoys", "medical teams", "emergency aid", "relief flights", "clean water supplies")
_PARTIES = ("ruling coalition", "governing party", "opposition alliance", "new prime minister")
_ATTACKS = (
    "a car bomb exploded", "militants attacked a police station", "troops clashed with rebels",
    "a roadside bomb hit an army convoy", "gunmen opened fire at a market",
)
_LAWS = (
    "extend the state of emergency", "approve the new constitution", "dissolve the cabinet",
    "hold early elections", "impeach the president",
)
_DISASTERS = ("an earthquake", "severe flooding", "a powerful cyclone", "a landslide", "a wildfire")

# sports
_TOWNS = (
    "Riverside", "Northbridge", "Ashford", "Kingsport", "Lakeview", "Milltown", "Westbrook",
    "Eastfield", "Stonebridge", "Fairhaven", "Redcliffe", "Harbourside",
)
_MASCOTS = (
    "Hawks", "Rovers", "United", "Lions", "Comets", "Rangers", "Wolves", "Sharks", "Falcons", "Titans",
)
_SPORTS = ("football", "basketball", "rugby", "ice hockey", "baseball", "volleyball", "handball")
_COMPETITIONS = (
    "the league title", "the championship final", "the cup semi-final", "the playoffs",
    "the season opener", "the national cup final", "the quarter-finals",
)
_TOURNAMENTS = ("national open", "indoor", "masters", "grand prix", "clay court")
_INDIVIDUAL_SPORTS = ("tennis", "golf", "squash", "badminton", "table tennis")
_EVENTS = ("100 metres", "marathon", "800 metres", "high jump", "400 metres hurdles", "long jump")
_MEETS = ("athletics championships", "indoor games", "summer games", "world championships")
_POSITIONS = ("striker", "goalkeeper", "midfielder", "defender", "point guard", "fly-half")

# business
_COMPANY_STEMS = (
    "Halvorsen", "Meridian", "Crestline", "Northwind", "Bellamy", "Oakridge", "Pioneer", "Silverline",
    "Granite", "Harborview", "Kestrel", "Larkspur",
)
_COMPANY_KINDS = (
    "Foods", "Bank", "Motors", "Airlines", "Energy", "Retail", "Steel", "Insurance", "Holdings",
    "Pharmaceuticals", "Logistics", "Breweries",
)
_MARKETS = ("Asia", "Europe", "North America", "Latin America", "emerging markets", "its home market")
_EXCHANGES = ("Wall Street", "European markets", "Asian markets", "the main stock index")
_ECONOMIC_NEWS = (
    "strong retail sales figures", "lower unemployment figures", "upbeat earnings reports",
    "falling bond yields", "a drop in oil prices", "signs of cooling inflation",
)
_DEAL_TERMS = ("in cash and stock", "in an all-cash deal", "including debt", "in a hostile bid")

# science / technology
_TECH_COMPANIES = (
    "Quantix", "Novabyte", "Lumensoft", "Cirrus Labs", "Vantacore", "Pixelwave", "Synthetica",
    "Orbitron",
)
_DEVICES = (
    "smartphone", "laptop", "tablet", "video game console", "music player", "smartwatch",
    "digital camera", "e-book reader",
)
_SOFTWARE = (
    "web browser", "email program", "operating system", "media player", "search engine",
    "messaging app", "photo editing software",
)
_UNIVERSITIES = (
    "Eastfield University", "the Institute of Technology", "Northbridge College", "the national lab",
    "Lakeview University",
)
_MATERIALS = (
    "flexible battery", "transparent solar cell", "self-healing plastic", "faster memory chip",
    "cheaper superconductor", "graphene sensor",
)
_CELESTIAL = ("a rocky planet", "two icy moons", "a ring of dust", "a gas giant", "a comet")
_PLANETS = ("Mars", "Jupiter", "Saturn's moons", "Venus", "the asteroid belt", "Mercury")
_ORGANISMS = ("honey bee", "chimpanzee", "rice plant", "malaria parasite", "sea urchin", "platypus")
_BIOLOGY = (
    "diseases evolve", "brains grow", "plants resist drought", "animals sense magnetism",
    "immune cells age",
)
_ROBOT_TASKS = ("climb stairs", "sort recycling", "fold laundry", "walk on sand", "pick ripe fruit")
_TECH_FIELDS = ("wireless charging", "chip design", "speech recognition", "display", "data storage")

# --------------------------------------------------------------------------------------------------
# Templates: {slot} is filled from _SLOTS; a trailing digit ({country2}) asks for a second, different
# value of the same slot. Filler values may contain slots themselves (nested filling).
# --------------------------------------------------------------------------------------------------

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "world": (
        "{leader} of {country} met {leader2} of {country2} to discuss {world_issue}",
        "thousands of {group} marched through {city} demanding {demand}",
        "{country} and {country2} agreed to {world_action} after {number} days of talks",
        "the United Nations urged {country} to let {aid} into {region} as fighting continued",
        "voters in {country} go to the polls {when} in an election seen as a test for the {party}",
        "at least {number} people died when {attack} in {region} of {country}",
        "{country} recalled its ambassador from {country2} in a row over {world_issue}",
        "parliament in {country} voted to {law}, ending weeks of political deadlock",
        "{group} fled across the border into {country} after {number} days of heavy fighting",
        "rescue teams searched for survivors after {disaster} struck {region} of {country}",
        # borderline: another topic's vocabulary, but political stories
        "{leader} of {country} warned that the war in {country2} could hurt trade across the region",
        "{country} imposed sanctions on {country2} and froze the assets of its leaders",
        "the government of {country} blocked {tech_company} services as protests spread to {city}",
        "{person}, a former {sport} star, was sworn in as president of {country}",
    ),
    "sports": (
        "{team} beat {team2} {score} to reach {competition}",
        "{person} scored twice in the second half as {team} beat {team2} {score}",
        "{person} won the {tournament} {individual_sport} title after a long final against {person2}",
        "{team} sacked their coach after a run of {small_word} straight defeats",
        "{person} broke the {event} record at the {meet} in {city}",
        "{team} signed {position} {person} on a {small_word}-year contract",
        "an injury forced {person} to miss {competition}, a blow to {team}",
        "the {sport} season opens {when} with {team} defending their title against {team2}",
        "{person} hit a century as {country} beat {country2} by {small_word} wickets in the first test",
        "{team} fans celebrated in {city} after the club won {competition} on penalties",
        # borderline: another topic's vocabulary, but sports stories
        "{country} will host the next {sport} world cup after beating {country2} in the final vote",
        "{person} of {country} won gold in the {event} at the {meet}",
        "wearing new shirts from sponsor {company}, {team} beat {team2} {score}",
        "a power cut at the {company} Arena delayed the game between {team} and {team2}",
    ),
    "business": (
        "{company} said quarterly profit rose {pct} percent on strong demand in {market}",
        "shares of {company} fell {pct} percent after the firm cut its full-year sales forecast",
        "{company} agreed to buy {company2} for ${money} billion {deal_terms}",
        "the central bank of {country} raised interest rates by {bps} basis points to curb inflation",
        "oil prices climbed to ${price} a barrel on worries about supply from {country}",
        "{company} plans to cut {thousands} jobs to save ${money} million a year",
        "stocks on {exchange} closed higher as investors cheered {economic_news}",
        "{company} reported a {pct} percent jump in revenue, beating analysts' expectations",
        "unions at {company} called a strike over pay, threatening deliveries across {country}",
        # borderline: another topic's vocabulary, but business stories
        "{tech_company} raised ${money} million in its stock market debut, valuing it at ${money2} billion",
        "{team} reported record ticket sales and a stadium sponsorship deal worth ${money} million",
        "{company} signed a ${money} million deal to sponsor {team} for {small_word} seasons",
        "{tech_company} said profit fell as sales of its {device} slowed in {market}",
        "the economy of {country} grew {pct} percent last quarter, faster than economists expected",
    ),
    "science/tech": (
        "{tech_company} unveiled a new {device} with a faster processor and longer battery life",
        "astronomers using a new telescope discovered {celestial} orbiting a distant star",
        "{researchers} developed a {material} that could power the next {device}",
        "a security flaw in a popular {software} lets hackers take control of computers, experts warned",
        "the space agency launched a probe to study {planet}, a journey of {number} million kilometres",
        "{tech_company} released an update to its {software} to fix {small_word} security holes",
        "scientists decoded the genome of the {organism}, shedding light on how {biology}",
        "{researchers} built a robot that can {robot_task} without human help",
        "{tech_company} and {tech_company2} agreed to share patents on {tech_field} technology",
        "spam and computer viruses cost {country} firms {number} million hours a year, a study found",
        # borderline: another topic's vocabulary, but science and technology stories
        "{country} launched its first weather satellite from a site near {city}",
        "hackers stole files from a government ministry in {country}, a computer security firm said",
        "sports scientists at {university} found that {sport} players who sleep longer react faster",
        "{company} will use robots built by {tech_company} to run its warehouses",
    ),
}

# Label-independent noise, shared by every class.
_OPENERS = (
    "on {weekday},", "late on {weekday},", "in a surprise move,", "as expected,",
    "for the first time in {small_word} years,", "in a closely watched decision,",
)
_TAILS = (
    ", officials said on {weekday}", ", according to a statement", ", {person} told reporters",
    ", sources close to the matter said", ", local media reported", " earlier this week",
    ", the report said", " despite heavy rain", ", a spokesperson said", ", {person} said",
)
_DATELINE = "{city_upper} ({wire}) -"

_OPENER_RATE = 0.2
_TAIL_RATE = 0.5
_DATELINE_RATE = 0.2
_MAX_ATTEMPTS_PER_EXAMPLE = 50


def _score(rng: random.Random) -> str:
    winner = rng.randint(1, 6)
    return f"{winner}-{rng.randint(0, winner - 1)}"


def _money(rng: random.Random) -> str:
    whole = rng.randint(1, 95)
    return f"{whole}.{rng.randint(1, 9)}" if rng.random() < 0.4 else str(whole)


def _percent(rng: random.Random) -> str:
    return f"{rng.randint(1, 25)}.{rng.randint(1, 9)}" if rng.random() < 0.5 else str(rng.randint(2, 40))


def _team(rng: random.Random) -> str:
    return f"the {rng.choice(_TOWNS)} {rng.choice(_MASCOTS)}"


_Filler = tuple[str, ...] | Callable[[random.Random], str]

_SLOTS: dict[str, _Filler] = {
    # shared noise
    "person": lambda rng: f"{rng.choice(_PEOPLE_FIRST)} {rng.choice(_PEOPLE_LAST)}",
    "country": _COUNTRIES,
    "city": _CITIES,
    "city_upper": lambda rng: rng.choice(_CITIES).upper(),
    "weekday": _WEEKDAYS,
    "wire": _WIRES,
    "when": ("on Sunday", "next week", "this weekend", "later this month", "on {weekday}"),
    "number": lambda rng: str(rng.randint(3, 90)),
    "small_word": _SMALL_WORDS,
    # world
    "leader": _LEADERS,
    "region": _REGIONS,
    "world_issue": _WORLD_ISSUES,
    "group": _GROUPS,
    "demand": _DEMANDS,
    "world_action": _WORLD_ACTIONS,
    "aid": _AID,
    "party": _PARTIES,
    "attack": _ATTACKS,
    "law": _LAWS,
    "disaster": _DISASTERS,
    # sports
    "team": _team,
    "score": _score,
    "sport": _SPORTS,
    "competition": _COMPETITIONS,
    "tournament": _TOURNAMENTS,
    "individual_sport": _INDIVIDUAL_SPORTS,
    "event": _EVENTS,
    "meet": _MEETS,
    "position": _POSITIONS,
    # business
    "company": lambda rng: f"{rng.choice(_COMPANY_STEMS)} {rng.choice(_COMPANY_KINDS)}",
    "market": _MARKETS,
    "exchange": _EXCHANGES,
    "economic_news": _ECONOMIC_NEWS,
    "deal_terms": _DEAL_TERMS,
    "pct": _percent,
    "money": _money,
    "price": lambda rng: str(rng.randint(40, 130)),
    "bps": ("25", "50", "75", "100"),
    "thousands": lambda rng: f"{rng.randint(1, 12)},{rng.randint(0, 9)}00",
    # science / technology
    "tech_company": _TECH_COMPANIES,
    "device": _DEVICES,
    "software": _SOFTWARE,
    "researchers": (
        "researchers at {university}", "scientists at {university}", "engineers at {tech_company}",
    ),
    "university": _UNIVERSITIES,
    "material": _MATERIALS,
    "celestial": _CELESTIAL,
    "planet": _PLANETS,
    "organism": _ORGANISMS,
    "biology": _BIOLOGY,
    "robot_task": _ROBOT_TASKS,
    "tech_field": _TECH_FIELDS,
}

_FORMATTER = string.Formatter()


def _slot_names(template: str) -> list[str]:
    return [field for _, field, _, _ in _FORMATTER.parse(template) if field]


def _fill(template: str, rng: random.Random, used: dict[str, set[str]], depth: int = 0) -> str:
    """Fill every {slot} of ``template``; repeated slot kinds ({country}, {country2}) get distinct values."""
    if depth > 3:
        raise RuntimeError(f"synthetic template nests too deeply: {template!r}")
    values: dict[str, str] = {}
    for field in _slot_names(template):
        if field in values:
            continue
        kind = field.rstrip("0123456789")
        taken = used.setdefault(kind, set())
        for _ in range(20):  # a few redraws keep "{country} and {country2}" from naming one country
            value = _draw(_SLOTS[kind], rng)
            if value not in taken:
                break
        taken.add(value)
        values[field] = _fill(value, rng, used, depth + 1) if "{" in value else value
    return template.format(**values)


def _draw(filler: _Filler, rng: random.Random) -> str:
    return filler(rng) if callable(filler) else rng.choice(filler)


def _word_count(text: str) -> int:
    return len(text.split())


def _compose_sentence(topic: str, rng: random.Random) -> str:
    """One sentence of ``topic``: a filled template plus optional shared noise, kept to MAX_WORDS."""
    used: dict[str, set[str]] = {}
    sentence = _fill(rng.choice(_TEMPLATES[topic]), rng, used)
    # Draw every noise decision unconditionally so the random stream does not depend on lengths.
    opener = _fill(rng.choice(_OPENERS), rng, used) if rng.random() < _OPENER_RATE else ""
    tail = _fill(rng.choice(_TAILS), rng, used) if rng.random() < _TAIL_RATE else ""
    dateline = _fill(_DATELINE, rng, used) if rng.random() < _DATELINE_RATE else ""
    if tail and _word_count(sentence + tail) <= MAX_WORDS:
        sentence += tail
    if opener and _word_count(f"{opener} {sentence}") <= MAX_WORDS:
        sentence = f"{opener} {sentence}"
    sentence = sentence[0].upper() + sentence[1:] + "."
    if dateline and _word_count(f"{dateline} {sentence}") <= MAX_WORDS:
        sentence = f"{dateline} {sentence}"
    return sentence


def generate_topics(num_examples: int, seed: int = 0) -> TextExamples:
    """Generate ``num_examples`` distinct, class-balanced news-topic sentences, deterministic for ``seed``.

    Labels follow ``TOPIC_LABEL_NAMES`` (world, sports, business, science/tech); class sizes differ by at
    most one. Sentences are unique within one call, so a train/eval split of one call never leaks a
    sentence from eval into train.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise DataError(f"generate_topics: num_examples must be a positive integer, got {num_examples!r}")
    rng = random.Random(seed)
    labels = [index % len(TOPIC_LABEL_NAMES) for index in range(num_examples)]
    rng.shuffle(labels)
    seen: set[str] = set()
    texts: list[str] = []
    for label in labels:
        texts.append(_new_sentence(TOPIC_LABEL_NAMES[label], rng, seen, num_examples))
    return TextExamples(texts=texts, labels=labels, label_names=list(TOPIC_LABEL_NAMES))


def _new_sentence(topic: str, rng: random.Random, seen: set[str], num_examples: int) -> str:
    for _ in range(_MAX_ATTEMPTS_PER_EXAMPLE):
        sentence = _compose_sentence(topic, rng)
        if sentence not in seen:
            seen.add(sentence)
            return sentence
    raise DataError(
        f"generate_topics: could not find a new distinct '{topic}' sentence after {len(seen)} sentences; "
        f"num_examples={num_examples} is too large for the synthetic task, use a smaller data.num_examples"
    )
