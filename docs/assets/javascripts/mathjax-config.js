// MathJax 2 served by this site (copied from the jupyter-server-mathjax package at build time).
// Arithmatex (generic mode) wraps math in \( \) and \[ \] inside elements of class "arithmatex".
window.MathJax = {
  jax: ["input/TeX", "output/SVG"],
  extensions: ["tex2jax.js"],
  TeX: { extensions: ["AMSmath.js", "AMSsymbols.js", "noErrors.js", "noUndefined.js"] },
  tex2jax: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    ignoreClass: ".*",
    processClass: "arithmatex"
  },
  showMathMenu: false,
  messageStyle: "none",
  SVG: { font: "TeX" }
};
