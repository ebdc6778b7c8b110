/**
 * OpenAI's chat fine-tune format, line by line, on top of Tunery's dataset validation: a line is
 * `{"messages": [{"role", "content"}, ...]}` only. OpenAI's other keys (`weight`, `name`,
 * `tool_calls`, `tools`…) would change what is trained; Tunery's datasets do not keep them, so they
 * are refused with the line's number instead of being dropped.
 */

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

/** Throws a message (the caller prefixes `line N:`) for a key Tunery would not honour. */
export function checkOpenAIChatLine(record: unknown): void {
  // what is not an object, or not a list of messages, the dataset validator explains
  if (!isObject(record)) return;
  const extra = Object.keys(record).find((key) => key !== 'messages');
  if (extra) throw new Error(`"${extra}" is not supported: a line holds only "messages"`);
  if (!Array.isArray(record.messages)) return;
  record.messages.forEach((message, i) => {
    if (!isObject(message)) return;
    const key = Object.keys(message).find((k) => k !== 'role' && k !== 'content');
    if (key) throw new Error(`messages[${i}].${key} is not supported`);
  });
}
