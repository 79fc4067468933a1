//! The workflow graph: named nodes, each a step plus where its inputs come from, stored in a
//! petgraph `DiGraph`. Built once per run from the config; validated on build (unknown nodes or
//! outputs, duplicates, cycles named along the cycle).

use crate::error::EngineError;
use crate::step::Step;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where one input of a node comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum InputSource {
    /// Output `output` of node `node` in the same DAG.
    Node { node: String, output: String },
    /// A file or directory outside the store (e.g. the user's prompts or model). Its content
    /// fingerprint is part of the step key, and an edit between runs is detected.
    External(PathBuf),
}

impl InputSource {
    pub fn node(node: &str, output: &str) -> Self {
        InputSource::Node {
            node: node.to_string(),
            output: output.to_string(),
        }
    }
}

pub struct Node {
    pub name: String,
    pub step: Arc<dyn Step>,
    pub inputs: BTreeMap<String, InputSource>,
    /// The iteration this node belongs to, for `replay --iteration` and reports.
    pub iteration: Option<u32>,
}

impl Node {
    /// The node's external inputs (files or folders outside the store), by input name.
    pub fn external_paths(&self) -> BTreeMap<String, PathBuf> {
        self.inputs
            .iter()
            .filter_map(|(k, s)| match s {
                InputSource::External(p) => Some((k.clone(), p.clone())),
                _ => None,
            })
            .collect()
    }
}

pub struct Dag {
    nodes: Vec<Node>,
    graph: DiGraph<usize, ()>,
    by_name: BTreeMap<String, usize>,
    topo: Vec<usize>,
}

impl Dag {
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    /// Nodes in a topological order (deterministic: ties broken by insertion order).
    pub fn topo(&self) -> impl Iterator<Item = &Node> {
        self.topo.iter().map(|&i| &self.nodes[i])
    }
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.by_name.get(name).map(|&i| &self.nodes[i])
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    /// Direct upstream node names of a node.
    pub fn upstream(&self, name: &str) -> Vec<&str> {
        let Some(&i) = self.by_name.get(name) else {
            return vec![];
        };
        let mut v: Vec<&str> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
            .map(|n| self.nodes[self.graph[n]].name.as_str())
            .collect();
        v.sort();
        v.dedup();
        v
    }
    /// A Graphviz rendering, for `tsr plan --dot`.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph tsr {\n  rankdir=LR;\n");
        for n in &self.nodes {
            s.push_str(&format!(
                "  \"{}\" [label=\"{}\\n{}\"];\n",
                n.name,
                n.name,
                n.step.kind()
            ));
        }
        for n in &self.nodes {
            for (input, src) in &n.inputs {
                if let InputSource::Node { node, output } = src {
                    s.push_str(&format!(
                        "  \"{node}\" -> \"{}\" [label=\"{output}->{input}\"];\n",
                        n.name
                    ));
                }
            }
        }
        s.push_str("}\n");
        s
    }
}

#[derive(Default)]
pub struct DagBuilder {
    nodes: Vec<Node>,
}

impl DagBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a node. Inputs are `(input name, source)` pairs.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        step: Arc<dyn Step>,
        inputs: Vec<(&str, InputSource)>,
        iteration: Option<u32>,
    ) -> &mut Self {
        self.nodes.push(Node {
            name: name.into(),
            step,
            inputs: inputs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            iteration,
        });
        self
    }

    pub fn build(self) -> Result<Dag, EngineError> {
        let mut by_name = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            tsr_state::validate_name(&n.name).map_err(|e| EngineError::BadNode {
                node: n.name.clone(),
                reason: e.to_string(),
            })?;
            if by_name.insert(n.name.clone(), i).is_some() {
                return Err(EngineError::DuplicateNode(n.name.clone()));
            }
        }
        let mut graph = DiGraph::<usize, ()>::new();
        for i in 0..self.nodes.len() {
            graph.add_node(i);
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for (input, src) in &n.inputs {
                if let InputSource::Node { node, output } = src {
                    let &j = by_name.get(node).ok_or_else(|| EngineError::UnknownNode {
                        node: n.name.clone(),
                        input: input.clone(),
                        from: node.clone(),
                    })?;
                    if !self.nodes[j].step.outputs().contains(&output.as_str()) {
                        return Err(EngineError::BadNode {
                            node: n.name.clone(),
                            reason: format!(
                                "input `{input}` wants output `{output}` of `{node}`, which produces only {:?}",
                                self.nodes[j].step.outputs()
                            ),
                        });
                    }
                    graph.add_edge(NodeIndex::new(j), NodeIndex::new(i), ());
                }
            }
        }
        let topo = topo_order(&graph, &self.nodes)?;
        Ok(Dag {
            nodes: self.nodes,
            graph,
            by_name,
            topo,
        })
    }
}

/// Kahn's algorithm with a min-heap on insertion index, so the order is deterministic. On a cycle,
/// report one cycle as `a -> b -> a`.
fn topo_order(graph: &DiGraph<usize, ()>, nodes: &[Node]) -> Result<Vec<usize>, EngineError> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = graph.node_count();
    let mut indeg: Vec<usize> = (0..n)
        .map(|i| {
            graph
                .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indeg[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = heap.pop() {
        order.push(i);
        for m in graph.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing) {
            let m = m.index();
            indeg[m] -= 1;
            if indeg[m] == 0 {
                heap.push(Reverse(m));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Some node is on a cycle: walk the remaining subgraph until a node repeats.
    let remaining: Vec<usize> = (0..n).filter(|&i| indeg[i] > 0).collect();
    let mut path = vec![remaining[0]];
    loop {
        let cur = *path.last().unwrap();
        let next = graph
            .neighbors_directed(NodeIndex::new(cur), petgraph::Direction::Outgoing)
            .map(|x| x.index())
            .filter(|x| indeg[*x] > 0)
            .min()
            .expect("a node left by Kahn's algorithm has a remaining successor");
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let cycle: Vec<&str> = path[pos..]
                .iter()
                .chain(std::iter::once(&next))
                .map(|&i| nodes[i].name.as_str())
                .collect();
            return Err(EngineError::Cycle(cycle.join(" -> ")));
        }
        path.push(next);
    }
}
