"""Synthetic document QA in the shape of morgan/docvqa-nanochat, deterministic from a seed.

Each conversation is one short OCR-like document (invoice, receipt, form, letter, ...) and one question
whose answer is a field printed in it. Conversation i of `synthetic_docqa(n, seed)` depends only on
(seed, i), so a larger n extends a smaller one. Documents are short (~150-250 bytes per rendered
conversation) so a byte-level model with sequence_len 256 sees whole conversations.

Only the standard library is used (and no global random state), so this module is a leaf that any
layer, the tiny base model included, may import.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FIRST = ["Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Ines", "Jon", "Kara", "Liam",
         "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor"]
LAST = ["Smith", "Garcia", "Chen", "Patel", "Muller", "Rossi", "Kim", "Novak", "Silva", "Brown", "Dubois",
        "Ito", "Jensen", "Khan", "Lopez", "Moreau"]
COMPANIES = ["Acme Corp", "Blue Pine Ltd", "Nordic Tools", "Sunrise Foods", "Vertex Labs", "Harbor Supply",
             "Red Oak Inc", "Delta Print", "Green Leaf Co", "Atlas Freight", "Maple Bank", "Orion Media"]
STREETS = ["Main St", "Oak Ave", "Park Rd", "Elm St", "Lake Dr", "Hill Rd", "River Ln", "Mill St"]
CITIES = ["Boston", "Denver", "Austin", "Dublin", "Lyon", "Porto", "Oslo", "Kyoto", "Leeds", "Perth"]
ITEMS = ["paper", "toner", "chairs", "cables", "lamps", "coffee", "folders", "pens", "desks", "bolts"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
SUBJECTS = ["Math", "History", "Physics", "Biology", "Art", "Music", "French", "Chemistry"]
GRADES = ["A", "A-", "B+", "B", "B-", "C+", "C"]
DRUGS = ["Amoxicillin", "Ibuprofen", "Metformin", "Lisinopril", "Cetirizine", "Omeprazole"]


def _name(r: random.Random) -> str:
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def _date(r: random.Random) -> str:
    return f"{r.randint(1, 28):02d} {r.choice(MONTHS)} {r.randint(1995, 2024)}"


def _money(r: random.Random, lo: float = 5, hi: float = 5000) -> str:
    return f"${r.uniform(lo, hi):,.2f}"


def _code(r: random.Random, prefix: str, digits: int = 5) -> str:
    return f"{prefix}-{r.randrange(10 ** (digits - 1), 10 ** digits)}"


def _address(r: random.Random) -> str:
    return f"{r.randint(1, 999)} {r.choice(STREETS)}, {r.choice(CITIES)}"


def _time(r: random.Random) -> str:
    return f"{r.randint(0, 23):02d}:{r.choice(['00', '15', '30', '45'])}"


# A field: (answer as printed in the document, question phrasings).
Field = tuple[str, list[str]]


@dataclass(frozen=True)
class Document:
    template: str
    text: str
    fields: list[Field]


def _invoice(r: random.Random) -> Document:
    no, date, to, total = _code(r, "INV"), _date(r), r.choice(COMPANIES), _money(r)
    item = f"{r.randint(2, 40)} x {r.choice(ITEMS)}"
    text = f"INVOICE {no}\nDate: {date}\nBill to: {to}\nItem: {item}\nTotal due: {total}"
    return Document("invoice", text, [
        (no, ["What is the invoice number?", "Which invoice number is shown?"]),
        (date, ["What is the invoice date?", "When was the invoice issued?"]),
        (to, ["Who is the invoice billed to?", "Which company is billed?"]),
        (total, ["What is the total due?", "How much is due on this invoice?"]),
    ])


def _receipt(r: random.Random) -> Document:
    shop, date, total, card = r.choice(COMPANIES), _date(r), _money(r, 2, 300), f"{r.randrange(10000):04d}"
    line = f"{r.choice(ITEMS)} {_money(r, 1, 50)}"
    text = f"{shop.upper()}\nRECEIPT {date} {_time(r)}\n{line}\nTOTAL {total}\nCARD ****{card}"
    return Document("receipt", text, [
        (total, ["What is the total on the receipt?", "How much was paid in total?"]),
        (date, ["On what date was this receipt printed?", "What is the date of purchase?"]),
        (card, ["What are the last four digits of the card?", "Which card digits are shown?"]),
    ])


def _form(r: random.Random) -> Document:
    name, dob, phone = _name(r), _date(r), f"555-{r.randrange(1000, 10000)}"
    addr = _address(r)
    text = f"APPLICATION FORM\nName: {name}\nDate of birth: {dob}\nAddress: {addr}\nPhone: {phone}"
    return Document("form", text, [
        (name, ["What is the applicant's name?", "Who filled in the form?"]),
        (dob, ["What is the date of birth?", "When was the applicant born?"]),
        (phone, ["What phone number is given?", "What is the applicant's phone number?"]),
        (addr, ["What address is written on the form?", "Where does the applicant live?"]),
    ])


def _letter(r: random.Random) -> Document:
    sender, to, date = _name(r), _name(r), _date(r)
    city = r.choice(CITIES)
    text = f"{city}, {date}\nDear {to},\nThank you for your order of {r.choice(ITEMS)}.\nSincerely,\n{sender}"
    return Document("letter", text, [
        (sender, ["Who signed the letter?", "Who is the sender of the letter?"]),
        (to, ["To whom is the letter addressed?", "Who is the recipient?"]),
        (date, ["What is the date of the letter?", "When was the letter written?"]),
        (city, ["In which city was the letter written?", "Where was the letter sent from?"]),
    ])


def _table(r: random.Random) -> Document:
    items = r.sample(ITEMS, 3)
    prices = [_money(r, 1, 99) for _ in items]
    rows = "\n".join(f"{item:<8} {price}" for item, price in zip(items, prices, strict=True))
    text = f"PRICE LIST {r.randint(1995, 2024)}\nItem     Price\n{rows}"
    k = r.randrange(3)
    return Document("table", text, [
        (prices[k], [f"What is the price of {items[k]}?", f"How much do {items[k]} cost?"]),
        (items[0], ["Which item is listed first?", "What is the first item in the table?"]),
    ])


def _shipping_label(r: random.Random) -> Document:
    to, addr, track, weight = _name(r), _address(r), f"1Z{r.randrange(10**9, 10**10)}", f"{r.randint(1, 40)} kg"
    text = f"SHIP TO: {to}\n{addr}\nFROM: {r.choice(COMPANIES)}\nTRACKING #{track}\nWEIGHT {weight}"
    return Document("shipping_label", text, [
        (to, ["Who is the package shipped to?", "What is the recipient's name?"]),
        (track, ["What is the tracking number?", "Which tracking number is printed?"]),
        (weight, ["What is the weight of the package?", "How heavy is the parcel?"]),
    ])


def _bank_statement(r: random.Random) -> Document:
    acct, holder, opening, closing = f"{r.randrange(10**7, 10**8)}", _name(r), _money(r), _money(r)
    text = (f"MAPLE BANK STATEMENT\nAccount: {acct}\nHolder: {holder}\n"
            f"Opening balance {opening}\nClosing balance {closing}")
    return Document("bank_statement", text, [
        (acct, ["What is the account number?", "Which account is this statement for?"]),
        (holder, ["Who is the account holder?", "Whose account is this?"]),
        (closing, ["What is the closing balance?", "How much is in the account at the end?"]),
        (opening, ["What is the opening balance?", "What was the balance at the start?"]),
    ])


def _memo(r: random.Random) -> Document:
    to, frm, date = _name(r), _name(r), _date(r)
    subject = f"{r.choice(ITEMS).title()} budget"
    text = f"MEMORANDUM\nTO: {to}\nFROM: {frm}\nDATE: {date}\nRE: {subject}"
    return Document("memo", text, [
        (frm, ["Who wrote the memo?", "Who is the memo from?"]),
        (to, ["Who is the memo addressed to?", "Who receives the memo?"]),
        (subject, ["What is the subject of the memo?", "What is the memo about?"]),
    ])


def _payslip(r: random.Random) -> Document:
    emp, eid, gross, net = _name(r), _code(r, "E", 4), _money(r, 2000, 6000), _money(r, 1000, 2000)
    period = f"{r.choice(MONTHS)} {r.randint(2000, 2024)}"
    text = f"PAYSLIP {period}\nEmployee: {emp} ({eid})\nGross pay {gross}\nNet pay {net}"
    return Document("payslip", text, [
        (emp, ["Who is the employee?", "Whose payslip is this?"]),
        (eid, ["What is the employee ID?", "Which employee number is shown?"]),
        (net, ["What is the net pay?", "How much is paid after deductions?"]),
        (gross, ["What is the gross pay?", "What is the pay before deductions?"]),
    ])


def _boarding_pass(r: random.Random) -> Document:
    name, flight, gate, seat = _name(r).upper(), f"{r.choice(['BA', 'LH', 'AF', 'UA'])}{r.randint(100, 999)}", \
        f"{r.choice('ABCD')}{r.randint(1, 40)}", f"{r.randint(1, 40)}{r.choice('ABCDEF')}"
    text = f"BOARDING PASS\n{name}\nFLIGHT {flight} TO {r.choice(CITIES).upper()}\nGATE {gate} SEAT {seat}"
    return Document("boarding_pass", text, [
        (flight, ["What is the flight number?", "Which flight is this pass for?"]),
        (gate, ["What gate does the flight leave from?", "Which gate is printed?"]),
        (seat, ["What is the seat number?", "Which seat is assigned?"]),
    ])


def _prescription(r: random.Random) -> Document:
    patient, drug, dose, doctor = _name(r), r.choice(DRUGS), f"{r.choice([50, 100, 250, 500])} mg", _name(r)
    text = f"Rx  {_date(r)}\nPatient: {patient}\n{drug} {dose}, {r.randint(1, 3)}x daily\nDr. {doctor}"
    return Document("prescription", text, [
        (drug, ["Which drug is prescribed?", "What medication is on the prescription?"]),
        (dose, ["What is the dose?", "How many mg per dose?"]),
        (patient, ["Who is the patient?", "For whom is the prescription written?"]),
        (doctor, ["Which doctor signed it?", "Who is the prescribing doctor?"]),
    ])


def _utility_bill(r: random.Random) -> Document:
    acct, usage, amount, due = _code(r, "AC", 6), f"{r.randint(80, 900)} kWh", _money(r, 20, 400), _date(r)
    text = f"CITY POWER - ELECTRIC BILL\nAccount {acct}\nUsage: {usage}\nAmount due: {amount}\nDue by {due}"
    return Document("utility_bill", text, [
        (usage, ["How much electricity was used?", "What is the usage?"]),
        (amount, ["What is the amount due?", "How much has to be paid?"]),
        (due, ["When is the bill due?", "What is the due date?"]),
    ])


def _report_card(r: random.Random) -> Document:
    student = _name(r)
    subjects = r.sample(SUBJECTS, 3)
    grades = [r.choice(GRADES) for _ in subjects]
    rows = "\n".join(f"{s}: {g}" for s, g in zip(subjects, grades, strict=True))
    text = f"REPORT CARD {r.randint(2000, 2024)}\nStudent: {student}\n{rows}"
    k = r.randrange(3)
    return Document("report_card", text, [
        (student, ["Who is the student?", "Whose report card is this?"]),
        (grades[k], [f"What grade was given in {subjects[k]}?", f"What is the {subjects[k]} grade?"]),
    ])


TEMPLATES: dict[str, Callable[[random.Random], Document]] = {
    f.__name__.lstrip("_"): f
    for f in [_invoice, _receipt, _form, _letter, _table, _shipping_label, _bank_statement, _memo, _payslip,
              _boarding_pass, _prescription, _utility_bill, _report_card]
}


def _rng(seed: int, i: int, kind: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and Python versions.
    return random.Random(f"vmap-sweep/{kind}/{seed}/{i}")


def synthetic_document(seed: int, i: int) -> Document:
    """Document i of the stream for `seed`."""
    r = _rng(seed, i, "doc")
    return TEMPLATES[r.choice(sorted(TEMPLATES))](r)


def synthetic_docqa(n: int, seed: int) -> list[dict]:
    """n DocVQA-shaped conversations: user "Document:\\n<text>\\nSource: ...\\n\\nQuestion: <q>", assistant answer."""
    out = []
    for i in range(n):
        doc = synthetic_document(seed, i)
        r = _rng(seed, i, "question")
        answer, phrasings = r.choice(doc.fields)
        question = r.choice(phrasings)
        user = f"Document:\n{doc.text}\nSource: synthetic://{doc.template}/{seed}-{i}\n\nQuestion: {question}"
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out


def synthetic_documents(n: int, seed: int) -> list[str]:
    """n plain document texts (no questions, no chat format): pretraining text for the tiny base model."""
    return [synthetic_document(seed, i).text for i in range(n)]
