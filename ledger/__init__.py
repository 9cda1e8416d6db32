"""The ledger plane: one beancount ledger per project, at `financial/<project>/ledger.beancount`.

Chart of accounts (every account holds the project's primary currency, CAD by default):

- `Assets:Budget:<Project>`: money the project may still spend; funded from equity, drawn down
  by every expense.
- `Equity:Budget:Funding`: where budget comes from; one funding transaction per budget grant,
  keyed by `funding: "<name>"` metadata (a trial, a period).
- `Expenses:Inference:<Provider>:<Model>`: metered LLM usage, one transaction per posting key
  (an assignment, an hour × machine), with USD amount, tokens and machine as posting metadata.
- Later: `Expenses:Compute` (GPU/CPU hours), `Expenses:Purchases` (payments),
  `Income:Revenue`.

USD prices are converted with the rate written as `price USD <rate> <currency>` directives.
Writes go through `ledger.book.Ledger`, which validates every change with beancount before an
atomic replace, so the file on disk always passes `bean-check`.
"""
