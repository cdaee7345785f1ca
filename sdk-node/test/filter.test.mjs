// Wasm filters uploaded from Node and applied on consume.
import { test } from 'node:test'

// The broker and the client core have Wasm filters since issue 10 (which landed after this
// SDK); this binding has not wired them yet. Until it does, the facade's
// uploadFilter/listFilters/deleteFilter and the consumer's `filter` option reject with code
// 'unsupported' (errors.test.mjs checks that).
test('a Wasm filter uploaded from Node is applied on consume', {
  skip: 'waits for the Node SDK to wire the client core filter API (landed with issue 10 after this SDK)',
}, async () => {})
