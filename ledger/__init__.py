"""The ledger plane: one beancount ledger per project, at `financial/<project>/ledger.beancount`.

Chart of accounts (every account holds the project's primary currency, CAD by default; the
full chart, file layout and posting rules are in docs/ledger.md):

- `Assets:Budget:<Project>`: money the project may still spend; funded from equity, drawn down
  by every expense; a balance assertion at the start of each day the scheduler runs.
- `Equity:Budget:Funding`: one funding transaction per budget grant (`funding:` metadata).
- `Expenses:Inference:<Provider>:<Model>`: metered LLM usage (local models priced by the hour
  of their machine, apportioned by tokens), posted hourly per machine × model with a leg per
  assignment (`ledger.posting`).
- `Expenses:Compute:VM:<Machine>`: worker VM time per assignment, priced per driver.
- `Expenses:Purchases:<Item>`: payments, with their fee as its own leg `Expenses:Fees:<Method>`
  (a failed attempt's fee alone, marked `<payment>/<attempt>`); `Income:Revenue:<Source>` into
  `Assets:Receipts:<Project>`: revenue; one transaction each.
- `Expenses:Sandbox:<Item>` against `Equity:Sandbox`: sandbox charges, which moved no money;
  never spend, never drawn from the budget.

Writes go through `ledger.book.Ledger`, which validates each change against the ledger's head
before atomic replaces, so the files on disk always pass `bean-check`.
"""
