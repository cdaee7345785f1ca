// Wasm filters uploaded from Node and applied on consume.
import { test } from 'node:test'

// The broker side is issue 10 (Wasm transforms), in progress; ketch-client has no filter
// upload or consume-filter API yet, so there is nothing for this SDK to call. Until it lands
// the facade's uploadFilter/listFilters/deleteFilter and the consumer's `filter` option reject
// with code 'unsupported' (errors.test.mjs checks that).
test('a Wasm filter uploaded from Node is applied on consume', {
  skip: 'waits for issue 10: ketch-client has no filter upload or consume-filter API yet',
}, async () => {})
