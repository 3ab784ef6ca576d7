"""The doctor's built-in calibration text: a little of each kind of text a language model
meets (prose, code, arithmetic, dialogue, lists, markup), written for moekit.

Encoded with the target's own tokenizer; `--data FILE` replaces it with the user's text.
"""

CALIBRATION_TEXT = '''\
The river had risen overnight, and by morning the low road to the mill was under a
hand's depth of brown water. Mara carried the lantern anyway, out of habit, and counted
the fence posts as she walked: forty-one to the bridge, nine more to the gate.

def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError(f"window ({window}) must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages

Question: a train leaves at 14:20 and arrives at 17:05. How long is the journey?
Answer: from 14:20 to 17:20 is 3 hours; 17:05 is 15 minutes earlier, so 2 hours 45 minutes.
Question: what is 17 * 24? Answer: 17 * 24 = 17 * 20 + 17 * 4 = 340 + 68 = 408.
If 3x + 7 = 25, then 3x = 18 and x = 6. The sum of the first n odd numbers is n squared.

User: Can you recommend a book about the history of mathematics?
Assistant: A readable start is a general history that follows numbers, geometry and
algebra from Babylon to the present; pick one with exercises if you want to practise.
User: Thanks! And something shorter?
Assistant: An essay collection works well: each chapter stands on its own.

Shopping list: flour (1 kg), eggs, 2 lemons, olive oil, rice, tea, a loaf of rye bread.
Meeting notes, 3 March: budget approved; the release moves to April; Lee owns testing.

<table><tr><th>city</th><th>population</th></tr><tr><td>Lyon</td><td>522,000</td></tr></table>
{"id": 1042, "status": "shipped", "items": [{"sku": "A-17", "qty": 3}], "paid": true}
SELECT name, count(*) FROM orders WHERE created > '2024-01-01' GROUP BY name ORDER BY 2 DESC;

for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop()

Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light
reactions happen in the thylakoid membranes; the Calvin cycle fixes carbon in the stroma.
In 1905 a patent clerk published four papers that changed physics: on the photoelectric
effect, Brownian motion, special relativity and the equivalence of mass and energy.

Der Zug fährt um acht Uhr ab. Le chat dort sur le canapé. El mercado abre temprano.
Error: file not found: /var/log/app/2024-05-01.log (errno 2); retrying in 5 s...
WARNING: disk usage at 91% on /dev/sda1; consider removing old snapshots.
'''
