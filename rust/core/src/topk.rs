//! A bounded top-k (min-heap on "goodness"; ties broken by the smaller id winning).

#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    s: Vec<f32>,
    id: Vec<i64>,
    thr: f32,
}

#[inline(always)]
fn worse(s1: f32, i1: i64, s2: f32, i2: i64) -> bool {
    s1 < s2 || (s1 == s2 && i1 > i2)
}

impl TopK {
    pub fn new(k: usize) -> TopK {
        // grown on demand: k may be far larger than the number of entries ever offered
        let cap = k.min(1024);
        TopK { k, s: Vec::with_capacity(cap), id: Vec::with_capacity(cap), thr: f32::NEG_INFINITY }
    }

    /// Scores must exceed this to possibly enter (-inf while not full).
    #[inline(always)]
    pub fn threshold(&self) -> f32 {
        self.thr
    }

    pub fn len(&self) -> usize {
        self.s.len()
    }

    pub fn is_empty(&self) -> bool {
        self.s.is_empty()
    }

    /// Offer an entry; keeps the k best.
    pub fn push(&mut self, score: f32, id: i64) {
        if self.s.len() < self.k {
            self.s.push(score);
            self.id.push(id);
            let mut c = self.s.len() - 1;
            while c > 0 {
                let p = (c - 1) / 2;
                if worse(self.s[c], self.id[c], self.s[p], self.id[p]) {
                    self.s.swap(c, p);
                    self.id.swap(c, p);
                    c = p;
                } else {
                    break;
                }
            }
            if self.s.len() == self.k {
                self.thr = self.s[0];
            }
            return;
        }
        if !worse(self.s[0], self.id[0], score, id) {
            return;
        }
        self.s[0] = score;
        self.id[0] = id;
        let n = self.s.len();
        let mut c = 0;
        loop {
            let a = 2 * c + 1;
            if a >= n {
                break;
            }
            let b = a + 1;
            let m = if b < n && worse(self.s[b], self.id[b], self.s[a], self.id[a]) { b } else { a };
            if worse(self.s[m], self.id[m], self.s[c], self.id[c]) {
                self.s.swap(c, m);
                self.id.swap(c, m);
                c = m;
            } else {
                break;
            }
        }
        self.thr = self.s[0];
    }

    /// The entries in heap order.
    pub fn entries(&self) -> impl Iterator<Item = (f32, i64)> + '_ {
        self.s.iter().copied().zip(self.id.iter().copied())
    }

    /// The entries best first.
    pub fn sorted(&self) -> Vec<(f32, i64)> {
        let mut v: Vec<(f32, i64)> = self.entries().collect();
        v.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        v
    }
}
