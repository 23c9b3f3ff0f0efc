//! Python's pickle format, only as far as plain data goes: the reader accepts the opcodes that build `None`,
//! booleans, integers, floats, strings, bytes, lists, tuples and dicts (protocols 2 to 5), and refuses every
//! opcode that would name a class or call anything (`GLOBAL`, `REDUCE`, `BUILD`, ...), so nothing in a file is
//! ever run. PyTorch's memory snapshots hold nothing else. The writer emits the same subset.
//!
//! The reader keeps every object in one arena and refers to it by index, so a memo reference (`BINGET`) costs
//! one index, never a copy: a file cannot grow in memory beyond its count of opcodes. It never panics: a
//! truncated file, an unknown opcode, a stack that runs dry or a memo index never stored is an `Error`.

use crate::error::Error;

/// Where an object lives in a [`Pickle`]'s arena.
pub type Id = u32;

/// One decoded object. Containers hold the ids of their items.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit 64 bits (kept only as a fact: snapshots have none).
    BigInt,
    Float(f64),
    Str(Box<str>),
    Bytes(Box<[u8]>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
}

/// A decoded pickle: its objects and the one the file returns.
#[derive(Debug, Clone)]
pub struct Pickle {
    objects: Vec<Value>,
    root: Id,
}

/// The most objects one pickle may build (about 1 GiB of arena at worst).
pub const MAX_OBJECTS: usize = 32 << 20;

fn parse_error(message: impl Into<String>) -> Error {
    Error::Parse {
        source: "pickle".to_string(),
        line: None,
        message: message.into(),
    }
}

/// The name of an opcode this reader refuses, for the message.
fn refused(op: u8) -> Option<&'static str> {
    Some(match op {
        b'c' => "GLOBAL (a reference to a Python class or function)",
        0x93 => "STACK_GLOBAL (a reference to a Python class or function)",
        b'R' => "REDUCE (a function call)",
        b'b' => "BUILD (an object's state)",
        b'i' => "INST (an object)",
        b'o' => "OBJ (an object)",
        0x81 => "NEWOBJ (an object)",
        0x92 => "NEWOBJ_EX (an object)",
        b'P' | b'Q' => "PERSID (a persistent reference)",
        0x82..=0x84 => "EXT (an extension reference)",
        0x96 | 0x97 => "BYTEARRAY8 / NEXT_BUFFER (out-of-band buffers)",
        0x98 => "READONLY_BUFFER (out-of-band buffers)",
        0x90 | 0x91 => "EMPTY_SET / FROZENSET (a set)",
        _ => return None,
    })
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(parse_error(format!(
                "the file ends early (byte {} of {} wants {n} more): it is truncated",
                self.pos,
                self.data.len()
            ))),
        }
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    fn len4(&mut self) -> Result<usize, Error> {
        Ok(u32::from_le_bytes(self.le::<4>()?) as usize)
    }

    fn len8(&mut self) -> Result<usize, Error> {
        usize::try_from(u64::from_le_bytes(self.le::<8>()?))
            .map_err(|_| parse_error("a length does not fit this machine"))
    }
}

/// Little-endian two's complement, as `LONG1` and `LONG4` store integers.
fn long_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        let sign = if bytes[bytes.len() - 1] & 0x80 != 0 {
            0xff
        } else {
            0
        };
        // Wider than 8 bytes but only sign extension above: still an i64.
        if bytes[8..].iter().all(|&b| b == sign) && (bytes[7] & 0x80 == sign & 0x80) {
            return long_value(&bytes[..8]);
        }
        return Value::BigInt;
    }
    let mut b = if bytes[bytes.len() - 1] & 0x80 != 0 {
        [0xffu8; 8]
    } else {
        [0u8; 8]
    };
    b[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(b))
}

impl Pickle {
    /// Decodes one pickle (protocol 2 or later, as `pickle.dump` writes by default), plain data only.
    ///
    /// # Errors
    /// `Parse` for a truncated or malformed file, or any opcode beyond plain data (named in the message).
    pub fn decode(data: &[u8]) -> Result<Pickle, Error> {
        let mut r = Reader { data, pos: 0 };
        let mut objects: Vec<Value> = Vec::new();
        let mut stack: Vec<Id> = Vec::new();
        let mut marks: Vec<usize> = Vec::new();
        let mut memo: Vec<Option<Id>> = Vec::new();
        if data.is_empty() {
            return Err(parse_error("the file is empty"));
        }
        if data[0] != 0x80 {
            return Err(parse_error(
                "this is not a pickle of protocol 2 or later (it does not start with the PROTO opcode, 0x80)",
            ));
        }
        macro_rules! push {
            ($v:expr) => {{
                if objects.len() >= MAX_OBJECTS {
                    return Err(parse_error(format!(
                        "more than {MAX_OBJECTS} objects: too large to read"
                    )));
                }
                objects.push($v);
                stack.push((objects.len() - 1) as Id);
            }};
        }
        let pop = |stack: &mut Vec<Id>, what: &str| -> Result<Id, Error> {
            stack
                .pop()
                .ok_or_else(|| parse_error(format!("{what} finds the stack empty")))
        };
        let pop_mark = |stack: &mut Vec<Id>, marks: &mut Vec<usize>, what: &str| {
            let m = marks
                .pop()
                .ok_or_else(|| parse_error(format!("{what} has no MARK before it")))?;
            if m > stack.len() {
                return Err(parse_error(format!("{what}: the stack lost its MARK")));
            }
            Ok::<Vec<Id>, Error>(stack.split_off(m))
        };
        let str_of = |bytes: &[u8]| -> Result<Value, Error> {
            std::str::from_utf8(bytes)
                .map(|s| Value::Str(s.into()))
                .map_err(|_| parse_error("a string is not valid UTF-8"))
        };
        loop {
            let at = r.pos;
            let op = r.u8()?;
            match op {
                0x80 => {
                    let v = r.u8()?;
                    if !(2..=5).contains(&v) {
                        return Err(parse_error(format!("pickle protocol {v} is not read (2 to 5 are)")));
                    }
                }
                0x95 => {
                    r.take(8)?; // FRAME: a length hint only.
                }
                b'.' => {
                    let root = pop(&mut stack, "STOP")?;
                    return Ok(Pickle { objects, root });
                }
                b'(' => marks.push(stack.len()),
                b'0' => {
                    pop(&mut stack, "POP")?;
                }
                b'1' => {
                    pop_mark(&mut stack, &mut marks, "POP_MARK")?;
                }
                b'2' => {
                    let top = *stack
                        .last()
                        .ok_or_else(|| parse_error("DUP finds the stack empty"))?;
                    stack.push(top);
                }
                b'N' => push!(Value::None),
                0x88 => push!(Value::Bool(true)),
                0x89 => push!(Value::Bool(false)),
                b'J' => push!(Value::Int(i64::from(i32::from_le_bytes(r.le::<4>()?)))),
                b'K' => push!(Value::Int(i64::from(r.u8()?))),
                b'M' => push!(Value::Int(i64::from(u16::from_le_bytes(r.le::<2>()?)))),
                0x8a => {
                    let n = r.u8()? as usize;
                    push!(long_value(r.take(n)?))
                }
                0x8b => {
                    let n = r.len4()?;
                    push!(long_value(r.take(n)?))
                }
                b'G' => push!(Value::Float(f64::from_be_bytes(r.le::<8>()?))),
                0x8c => {
                    let n = r.u8()? as usize;
                    push!(str_of(r.take(n)?)?)
                }
                b'X' => {
                    let n = r.len4()?;
                    push!(str_of(r.take(n)?)?)
                }
                0x8d => {
                    let n = r.len8()?;
                    push!(str_of(r.take(n)?)?)
                }
                b'C' => {
                    let n = r.u8()? as usize;
                    push!(Value::Bytes(r.take(n)?.into()))
                }
                b'B' => {
                    let n = r.len4()?;
                    push!(Value::Bytes(r.take(n)?.into()))
                }
                0x8e => {
                    let n = r.len8()?;
                    push!(Value::Bytes(r.take(n)?.into()))
                }
                b']' => push!(Value::List(Vec::new())),
                b')' => push!(Value::Tuple(Vec::new())),
                b'}' => push!(Value::Dict(Vec::new())),
                b'l' => {
                    let items = pop_mark(&mut stack, &mut marks, "LIST")?;
                    push!(Value::List(items))
                }
                b't' => {
                    let items = pop_mark(&mut stack, &mut marks, "TUPLE")?;
                    push!(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if stack.len() < n {
                        return Err(parse_error(format!("TUPLE{n} finds too few items")));
                    }
                    let items = stack.split_off(stack.len() - n);
                    push!(Value::Tuple(items))
                }
                b'd' => {
                    let items = pop_mark(&mut stack, &mut marks, "DICT")?;
                    if items.len() % 2 != 0 {
                        return Err(parse_error("DICT has a key without a value"));
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    push!(Value::Dict(pairs))
                }
                b'a' => {
                    let item = pop(&mut stack, "APPEND")?;
                    let list = *stack
                        .last()
                        .ok_or_else(|| parse_error("APPEND has no list"))?;
                    match objects.get_mut(list as usize) {
                        Some(Value::List(v)) => v.push(item),
                        _ => return Err(parse_error("APPEND to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = pop_mark(&mut stack, &mut marks, "APPENDS")?;
                    let list = *stack
                        .last()
                        .ok_or_else(|| parse_error("APPENDS has no list"))?;
                    match objects.get_mut(list as usize) {
                        Some(Value::List(v)) => v.extend(items),
                        _ => return Err(parse_error("APPENDS to something that is not a list")),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = pop(&mut stack, "SETITEM")?;
                        let k = pop(&mut stack, "SETITEM")?;
                        vec![k, v]
                    } else {
                        pop_mark(&mut stack, &mut marks, "SETITEMS")?
                    };
                    if items.len() % 2 != 0 {
                        return Err(parse_error("SETITEMS has a key without a value"));
                    }
                    let dict = *stack
                        .last()
                        .ok_or_else(|| parse_error("SETITEM has no dict"))?;
                    match objects.get_mut(dict as usize) {
                        Some(Value::Dict(d)) => {
                            d.extend(items.chunks_exact(2).map(|p| (p[0], p[1])))
                        }
                        _ => return Err(parse_error("SETITEM on something that is not a dict")),
                    }
                }
                0x94 | b'q' | b'r' => {
                    let index = match op {
                        0x94 => memo.len(),
                        b'q' => r.u8()? as usize,
                        _ => r.len4()?,
                    };
                    let top = *stack
                        .last()
                        .ok_or_else(|| parse_error("MEMOIZE finds the stack empty"))?;
                    if index >= memo.len() {
                        if index > objects.len() + memo.len() {
                            return Err(parse_error(format!("memo index {index} is out of range")));
                        }
                        memo.resize(index + 1, None);
                    }
                    memo[index] = Some(top);
                }
                b'h' | b'j' => {
                    let index = if op == b'h' {
                        r.u8()? as usize
                    } else {
                        r.len4()?
                    };
                    let id = memo.get(index).copied().flatten().ok_or_else(|| {
                        parse_error(format!("memo index {index} is used before it is stored"))
                    })?;
                    stack.push(id);
                }
                _ => {
                    return Err(parse_error(match refused(op) {
                        Some(name) => format!(
                            "byte {at} holds {name}, which plain data never needs: refused, nothing is run"
                        ),
                        None => format!("byte {at} holds opcode 0x{op:02x}, which is not read"),
                    }))
                }
            }
        }
    }

    /// The object the pickle returns.
    pub fn root(&self) -> Id {
        self.root
    }

    pub fn get(&self, id: Id) -> &Value {
        // Every id in the arena was pushed by `decode`, so it is in range; a stray one reads as None.
        self.objects.get(id as usize).unwrap_or(&Value::None)
    }

    /// The value under a string key of a dict (`None` if `id` is no dict or has no such key).
    pub fn field(&self, id: Id, key: &str) -> Option<Id> {
        match self.get(id) {
            Value::Dict(pairs) => pairs
                .iter()
                .rev()
                .find(|(k, _)| matches!(self.get(*k), Value::Str(s) if &**s == key))
                .map(|&(_, v)| v),
            _ => None,
        }
    }

    pub fn int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a list or tuple.
    pub fn items(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// A short name of the value's Python type, for messages.
    pub fn type_name(&self, id: Id) -> &'static str {
        match self.get(id) {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
        }
    }
}

/// Plain data to write as a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Py>),
    Tuple(Vec<Py>),
    Dict(Vec<(String, Py)>),
}

impl Py {
    /// A dict with string keys, from pairs.
    pub fn dict<const N: usize>(pairs: [(&str, Py); N]) -> Py {
        Py::Dict(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    pub fn str(s: &str) -> Py {
        Py::Str(s.to_string())
    }
}

/// Writes `value` as a protocol-4 pickle that Python's `pickle.load` reads (no memo, no frames: both optional).
pub fn encode(value: &Py) -> Vec<u8> {
    let mut out = vec![0x80, 4];
    write_value(value, &mut out);
    out.push(b'.');
    out
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    if s.len() < 256 {
        out.push(0x8c);
        out.push(s.len() as u8);
    } else {
        out.push(0x8d);
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn write_value(value: &Py, out: &mut Vec<u8>) {
    match value {
        Py::None => out.push(b'N'),
        Py::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Py::Int(i) => {
            if let Ok(small) = i32::try_from(*i) {
                out.push(b'J');
                out.extend_from_slice(&small.to_le_bytes());
            } else {
                out.push(0x8a);
                out.push(8);
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        Py::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Py::Str(s) => write_str(s, out),
        Py::List(items) => {
            out.push(b']');
            for chunk in items.chunks(1000) {
                out.push(b'(');
                for item in chunk {
                    write_value(item, out);
                }
                out.push(b'e');
            }
        }
        Py::Tuple(items) => {
            out.push(b'(');
            for item in items {
                write_value(item, out);
            }
            out.push(b't');
        }
        Py::Dict(pairs) => {
            out.push(b'}');
            if !pairs.is_empty() {
                out.push(b'(');
                for (k, v) in pairs {
                    write_str(k, out);
                    write_value(v, out);
                }
                out.push(b'u');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_plain_data() {
        let v = Py::dict([
            (
                "a",
                Py::List(vec![Py::Int(1), Py::Int(-2), Py::Int(1 << 40)]),
            ),
            (
                "b",
                Py::Tuple(vec![Py::None, Py::Bool(true), Py::Float(0.5)]),
            ),
            ("c", Py::str("naïve")),
        ]);
        let p = Pickle::decode(&encode(&v)).unwrap();
        let a = p.field(p.root(), "a").unwrap();
        let ints: Vec<i64> = p
            .items(a)
            .unwrap()
            .iter()
            .map(|&i| p.int(i).unwrap())
            .collect();
        assert_eq!(ints, [1, -2, 1 << 40]);
        assert_eq!(p.str(p.field(p.root(), "c").unwrap()), Some("naïve"));
        assert_eq!(p.type_name(p.field(p.root(), "b").unwrap()), "tuple");
    }

    #[test]
    fn reads_memo_references_without_copying() {
        // [x, x] where x = {} memoized: PROTO 4, EMPTY_LIST, MARK, EMPTY_DICT, MEMOIZE, BINGET 0, APPENDS, STOP.
        let p = Pickle::decode(&[0x80, 4, b']', b'(', b'}', 0x94, b'h', 0, b'e', b'.']).unwrap();
        let items = p.items(p.root()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], items[1]);
    }

    #[test]
    fn refuses_code_and_broken_files() {
        // A pickle that would call os.system: GLOBAL 'os system', refused before anything else happens.
        let evil = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
        let e = Pickle::decode(evil).unwrap_err().to_string();
        assert!(e.contains("GLOBAL") && e.contains("nothing is run"), "{e}");
        let e = Pickle::decode(&[0x80, 4, b']', b'('])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = Pickle::decode(b"{\"json\": 1}").unwrap_err().to_string();
        assert!(e.contains("not a pickle"), "{e}");
        let e = Pickle::decode(&[0x80, 4, b'h', 3, b'.'])
            .unwrap_err()
            .to_string();
        assert!(e.contains("memo index 3"), "{e}");
        assert_eq!(long_value(&[0xff]), Value::Int(-1));
        assert_eq!(long_value(&[0x00, 0x80]), Value::Int(-32768));
        assert_eq!(long_value(&[0x00, 0x80, 0x00]), Value::Int(32768));
        assert_eq!(long_value(&[1, 0, 0, 0, 0, 0, 0, 0, 1]), Value::BigInt);
    }
}
