// Keeps records whose value contains a string: params {"needle":"ERROR"} (default "ERROR").
import { Record, filter, onInit } from "../assembly";
export { ketch_abi_version, ketch_alloc, ketch_init, ketch_process } from "../assembly";

let needle = "ERROR";

onInit((params: string): string | null => {
  const key = params.indexOf("\"needle\"");
  if (key < 0) return null;
  const open = params.indexOf("\"", params.indexOf(":", key) + 1);
  const close = open < 0 ? -1 : params.indexOf("\"", open + 1);
  if (open < 0 || close < 0) return "\"needle\" must be a string";
  if (close == open + 1) return "\"needle\" must not be empty";
  needle = params.substring(open + 1, close);
  return null;
});

filter((r: Record): bool => r.valueContains(needle));
