// A small Markdown renderer for model replies. It builds DOM nodes and puts every piece of model text in a
// text node (no HTML parsing anywhere), so markup the model writes is shown as text, never parsed or executed.
// Covers what chat models write: fenced code (also unterminated, while streaming), headings, lists (nested),
// quotes, tables, rules, paragraphs; inline code, bold, italic, strikethrough, http(s) links.

const FENCE = /^\s*(`{3,}|~{3,})\s*([^`\s]*)/;
const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
// One alternative per inline form; the first that matches at the leftmost position wins.
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,                       // 1,2 code span
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,                                // 3 bold
  /(?<![\p{L}\p{N}_])__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_])/.source,  // 4 bold
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,                            // 5 italic
  /(?<![\p{L}\p{N}_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/.source, // 6 italic
  /~~(?=\S)([\s\S]*?\S)~~/.source,                                    // 7 strikethrough
  /!?\[([^\]\n]+)\]\(\s*([^()\s]+)(?:\s+"[^"]*")?\s*\)/.source,       // 8,9 link (images become links)
  /(https?:\/\/[^\s<>()"']*[^\s<>()"'.,;:!?])/.source,                 // 10 bare URL
].join("|"), "gu");

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function safeHref(url) {
  return /^(https?:\/\/|mailto:)/i.test(url) ? url : null;
}

function link(text, url, parent) {
  const href = safeHref(url);
  if (!href) {
    parent.append(text);
    return;
  }
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  inline(a, text);
  parent.append(a);
}

/** Append the inline Markdown of `text` (one line or paragraph, newlines become <br>) to `parent`. */
export function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) textWithBreaks(parent, text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1] !== undefined) {
      const code = el("code");
      code.textContent = m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
      parent.append(code);
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const b = el("strong");
      inline(b, m[3] ?? m[4]);
      parent.append(b);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const i = el("em");
      inline(i, m[5] ?? m[6]);
      parent.append(i);
    } else if (m[7] !== undefined) {
      const d = el("del");
      inline(d, m[7]);
      parent.append(d);
    } else if (m[8] !== undefined) {
      link(m[8], m[9], parent);
    } else {
      link(m[10], m[10], parent);
    }
  }
  if (last < text.length) textWithBreaks(parent, text.slice(last));
}

function textWithBreaks(parent, text) {
  text.split("\n").forEach((part, i) => {
    if (i) parent.append(el("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function codeBlock(code, lang) {
  const box = el("div", "code-block");
  const head = el("div", "code-head");
  const label = el("span", "code-lang");
  label.textContent = lang || "code";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(code, copy));
  head.append(label, copy);
  const pre = el("pre");
  const c = el("code");
  if (lang) c.dataset.lang = lang;
  c.textContent = code;
  pre.append(c);
  box.append(head, pre);
  return box;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);  // only in secure contexts (https, localhost)
  } catch {
    const area = document.createElement("textarea");  // plain-http fallback
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines, i) {
  const head = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : null));
  const t = el("table");
  const thead = el("thead");
  const tr = el("tr");
  head.forEach((cell, k) => {
    const th = el("th");
    if (aligns[k]) th.style.textAlign = aligns[k];
    inline(th, cell);
    tr.append(th);
  });
  thead.append(tr);
  const tbody = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = el("tr");
    splitRow(lines[i]).forEach((cell, k) => {
      const td = el("td");
      if (aligns[k]) td.style.textAlign = aligns[k];
      inline(td, cell);
      row.append(td);
    });
    tbody.append(row);
    i++;
  }
  t.append(thead, tbody);
  const wrap = el("div", "table-wrap");
  wrap.append(t);
  return [wrap, i];
}

function list(lines, i) {
  const first = lines[i].match(LIST);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(LIST);
    if (!m || m[1].length < indent) break;
    if (m[1].length > indent) {  // a nested list belongs to the previous item
      const [sub, next] = list(lines, i);
      (node.lastElementChild || node.appendChild(el("li"))).append(sub);
      i = next;
      continue;
    }
    if (/\d/.test(m[2]) !== ordered) break;
    const li = el("li");
    inline(li, m[3]);
    node.append(li);
    i++;
    while (i < lines.length && /^\s+\S/.test(lines[i]) && !LIST.test(lines[i]) && !FENCE.test(lines[i])) {
      li.append(el("br"));  // an indented continuation line of this item
      inline(li, lines[i].trim());
      i++;
    }
    let j = i;
    while (j < lines.length && !lines[j].trim()) j++;
    const after = j < lines.length ? lines[j].match(LIST) : null;
    if (j > i && !(after && after[1].length >= indent)) break;  // a blank line ends the list unless it goes on
    i = j;
  }
  return [node, i];
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST.test(line)
    || (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-"));
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = line.match(FENCE))) {
      const fence = m[1];
      const body = [];
      i++;
      // Closed by a line of the same fence character at least as long; unclosed (still streaming) runs to the end.
      while (i < lines.length && !new RegExp(`^\\s*${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`).test(lines[i])) {
        body.push(lines[i++]);
      }
      i++;
      parent.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = line.match(HEADING))) {
      const h = el(`h${Math.min(m[1].length + 2, 6)}`);  // h1/h2 are the page's own
      inline(h, m[2]);
      parent.append(h);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && lines[i].trim() && (m = lines[i].match(QUOTE))) {
        inner.push(m[1]);
        i++;
      }
      const q = el("blockquote");
      blocks(inner, q);
      parent.append(q);
    } else if (LIST.test(line)) {
      const [node, next] = list(lines, i);
      parent.append(node);
      i = next;
    } else if (startsBlock(lines, i)) {  // a table
      const [node, next] = table(lines, i);
      parent.append(node);
      i = next;
    } else {
      const para = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) para.push(lines[i++]);
      const p = el("p");
      inline(p, para.join("\n"));
      parent.append(p);
    }
  }
}

/** The Markdown `text` as a DocumentFragment; everything in it is text content, nothing is parsed as HTML. */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), frag);
  return frag;
}
