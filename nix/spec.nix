# Validation of mkGuest's argument: the same model as mvm.toml (src/mvm/spec.py), in the
# seed's camelCase names, with the same defaults. Returns the guest document that becomes
# /etc/mvm/guest.json (minus the fields the builder adds), or throws a message that names
# the attribute, e.g.
#   mkGuest: services.hello.comand: unknown attribute (did you mean 'command'?)
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    genList
    head
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isPath
    isString
    length
    mapAttrs
    match
    sort
    stringLength
    substring
    tail
    toString
    typeOf
    ;

  min = a: b: if a < b then a else b;
  max = a: b: if a > b then a else b;

  # Levenshtein distance, for "did you mean" suggestions.
  distance =
    a: b:
    let
      chars = s: genList (i: substring i 1 s) (stringLength s);
      ca = chars a;
      cb = chars b;
      lb = length cb;
      nextRow =
        prev: i:
        let
          ai = elemAt ca (i - 1);
        in
        foldl' (
          row: j:
          let
            cost = if ai == elemAt cb (j - 1) then 0 else 1;
            best = min (min (elemAt prev j + 1) (elemAt row (j - 1) + 1)) (elemAt prev (j - 1) + cost);
          in
          row ++ [ best ]
        ) [ i ] (genList (j: j + 1) lb);
    in
    elemAt (foldl' nextRow (genList (j: j) (lb + 1)) (genList (i: i + 1) (length ca))) lb;

  quoteList = xs: concatStringsSep ", " (map (x: "'${x}'") xs);

  suggestion =
    key: known:
    let
      ranked = sort (x: y: x.d < y.d) (map (k: { inherit k; d = distance key k; }) known);
      best = head ranked;
    in
    if key == "arch" || key == "system" then
      " (the architecture is the system the flake calls mkGuest for: mvm.lib.<system>.mkGuest)"
    else if ranked != [ ] && best.d <= max 2 (stringLength key / 3) then
      " (did you mean '${best.k}'?)"
    else
      " (known attributes: ${concatStringsSep ", " known})";

  fail = where: msg: throw "mkGuest: ${where}: ${msg}";

  describe =
    v:
    if isAttrs v && v ? type && v.type == "derivation" then "a package" else "a ${typeOf v}";

  # Refuse attributes not in `known`, naming the first with a suggestion.
  onlyKnown =
    where: known: attrs:
    let
      unknown = filter (k: !(elem k known)) (attrNames attrs);
      first = head unknown;
      rest = tail unknown;
      more = if rest == [ ] then "" else " (and also ${quoteList rest})";
    in
    if !isAttrs attrs then
      # `where` ends in the dot its attributes would follow ("services.web.")
      fail (
        if where == "" then "its argument" else substring 0 (stringLength where - 1) where
      ) "expected an attribute set { ... }, got ${describe attrs}"
    else if unknown == [ ] then
      attrs
    else
      fail "${where}${first}" "unknown attribute${suggestion first known}${more}";

  str =
    where: v:
    if isString v then
      v
    else
      fail where "expected a string, got ${describe v}";

  nonEmpty = where: v: if str where v == "" then fail where "must not be empty" else v;

  optStr = where: v: if v == null then null else str where v;

  number =
    where: v: lo: hi:
    if !(isInt v || isFloat v) then
      fail where "expected a number, got ${describe v}"
    else if v < lo || v > hi then
      fail where "${toString v} is out of range (${toString lo} to ${toString hi})"
    else
      v;

  positive =
    where: v:
    if !(isInt v || isFloat v) then
      fail where "expected a number, got ${describe v}"
    else if v <= 0 then
      fail where "must be greater than 0"
    else
      v;

  int =
    where: v: lo: hi:
    if !isInt v then fail where "expected an integer, got ${describe v}" else number where v lo hi;

  matching =
    where: re: what: v:
    if match re (str where v) == null then fail where "'${v}' is not a valid ${what}" else v;

  vmName = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";
  serviceName = "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}";
  userName = "[a-z_][a-z0-9_-]{0,31}";
  envName = "[A-Za-z_][A-Za-z0-9_]*";
  hostLabel = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
  hostnameRe = "${hostLabel}([.]${hostLabel})*";

  isPackage = p: (isAttrs p && p ? outPath) || (isString p && builtins.hasContext p);

  packages =
    where: v:
    if !isList v then
      fail where "expected a list of packages like [ pkgs.curl ], got ${describe v}"
    else
      genList (
        i:
        let
          p = elemAt v i;
        in
        if isPackage p then p else fail "${where}[${toString i}]" "expected a package like pkgs.curl, got ${describe p}"
      ) (length v);

  env =
    where: v:
    mapAttrs (
      k: x:
      if match envName k == null then
        fail "${where}.${k}" "'${k}' is not a valid environment variable name"
      else if isString x then
        x
      else if isInt x || isFloat x then
        toString x
      else
        fail "${where}.${k}" "expected a string, got ${describe x}"
    ) (onlyKnown where (attrNames v) v);

  restartPolicies = [
    "always"
    "on-failure"
    "no"
  ];

  serviceKeys = [
    "command"
    "preStart"
    "env"
    "user"
    "restart"
    "dependsOn"
  ];

  service =
    names: where: s':
    let
      s = onlyKnown "${where}." serviceKeys s';
    in
    {
      command =
        if s ? command then nonEmpty "${where}.command" s.command else fail "${where}.command" "required attribute is missing";
      preStart = str "${where}.preStart" (s.preStart or "");
      env = env "${where}.env" (s.env or { });
      user = matching "${where}.user" "^${userName}$" "user name" (s.user or "mvm");
      restart =
        let
          r = str "${where}.restart" (s.restart or "always");
        in
        if elem r restartPolicies then r else fail "${where}.restart" "'${r}' is not one of ${quoteList restartPolicies}";
      dependsOn = map (
        d:
        if elem d names then d else fail "${where}.dependsOn" "names unknown service '${d}'"
      ) (s.dependsOn or [ ]);
    };

  checkKeys = [
    "healthCmd"
    "healthIntervalSecs"
    "healthTimeoutSecs"
    "startupGraceSecs"
  ];

  healthCheck =
    where: h':
    let
      h = onlyKnown "${where}." checkKeys h';
    in
    {
      healthCmd =
        if h ? healthCmd then nonEmpty "${where}.healthCmd" h.healthCmd else fail "${where}.healthCmd" "required attribute is missing";
      healthIntervalSecs = positive "${where}.healthIntervalSecs" (h.healthIntervalSecs or 30);
      healthTimeoutSecs = positive "${where}.healthTimeoutSecs" (h.healthTimeoutSecs or 10);
      startupGraceSecs =
        let
          g = h.startupGraceSecs or null;
        in
        if g == null then null else number "${where}.startupGraceSecs" g 0 1.0e9;
    };

  topKeys = [
    "name"
    "packages"
    "services"
    "healthChecks"
    "hostname"
    "cpus"
    "memory"
    "logLimitMb"
    "files"
    "kernel"
  ];

  # files."/guest/path" = ./file-or-dir (or any store path), as mvm.toml's
  # files = { "/guest/path" = "file-or-dir" } (src/mvm/spec.py checks the same targets).
  files =
    where: v:
    mapAttrs (
      target: source:
      let
        at = "${where}.\"${target}\"";
        parts = builtins.split "/" target;
      in
      if match "/.*" target == null || elem ".." parts || match "/*" target != null then
        fail at "'${target}' must be an absolute guest path (not / and without '..')"
      else if match ".*[\t\n].*" target != null then
        fail at "a guest path must not contain tabs or newlines"
      else if isPath source || isPackage source then
        source
      else
        fail at "expected a path like ./server.py (or a package), got ${describe source}"
    ) (if isAttrs v then v else fail where "expected an attribute set { \"/app/server.py\" = ./server.py; }, got ${describe v}");

  # A dependsOn loop, as the path around it ([ "a" "b" "a" ]), or null: none of its services
  # would ever start (src/mvm/spec.py refuses the same).
  dependencyLoop =
    services:
    let
      fromFirst = x: l: if head l == x then l else fromFirst x (tail l);
      firstOf = f: foldl' (found: x: if found != null then found else f x) null;
      loopFrom =
        path: n:
        if elem n path then fromFirst n path ++ [ n ] else firstOf (loopFrom (path ++ [ n ])) services.${n}.dependsOn;
    in
    firstOf (loopFrom [ ]) (sort (a: b: a < b) (attrNames services));

  named =
    where: nameRe: f: set:
    mapAttrs (
      n: v:
      if match nameRe n == null then fail "${where}.${n}" "'${n}' is not a valid name" else f "${where}.${n}" v
    ) (onlyKnown where (attrNames set) set);
in
args':
let
  args = onlyKnown "" topKeys args';
  services = args.services or { };
  serviceNames = attrNames services;
in
{
  name =
    if args ? name then matching "name" "^${vmName}$" "VM name (use a-z, 0-9 and '-')" args.name else fail "name" "required attribute is missing";
  packages = packages "packages" (args.packages or [ ]);
  hostname =
    let
      v = optStr "hostname" (args.hostname or null);
    in
    if v == null || stringLength v <= 253 then
      (if v == null then null else matching "hostname" "^${hostnameRe}$" "hostname (labels of a-z, A-Z, 0-9 and '-', separated by dots)" v)
    else
      fail "hostname" "'${v}' is longer than 253 characters";
  cpus = int "cpus" (args.cpus or 1) 1 64;
  memory = int "memory" (args.memory or 512) 128 65536;
  logLimitMb = int "logLimitMb" (args.logLimitMb or 64) 1 1048576;
  services =
    let
      checked = named "services" "^${serviceName}$" (service serviceNames) services;
      loop = dependencyLoop checked;
    in
    if loop == null then
      checked
    else
      fail "services" "services depend on each other in a loop (${concatStringsSep " -> " loop}), so none of them would ever start: remove one dependsOn";
  healthChecks = named "healthChecks" "^${serviceName}$" healthCheck (args.healthChecks or { });
  files = files "files" (args.files or { });
  kernel =
    let
      k = args.kernel or null;
    in
    if k == null || isPackage k then k else fail "kernel" "expected a kernel package like pkgs.linuxPackages.kernel, got ${describe k}";
}
