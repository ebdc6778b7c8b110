/**
 * `map`'s value for `key`, made by `make` and stored on first use. For state kept per database
 * handle or queue signal: tests run several servers in one process, and none may see another's.
 */
export function getOrCreate<K extends object, V>(map: WeakMap<K, V>, key: K, make: () => V): V {
  let value = map.get(key);
  if (value === undefined) {
    value = make();
    map.set(key, value);
  }
  return value;
}
